"""Analysis of models: weight statistics now; sensitivity and reports later."""

from onnxq.analysis.inspect import LayerStats, ModelSummary, inspect_model

__all__ = ["LayerStats", "ModelSummary", "inspect_model"]

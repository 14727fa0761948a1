"""Analysis of models: weight statistics (``inspect``) and the quantization analyzer.

``onnxq.analysis.analyze`` (and its configuration and result types) is imported on first use, so
``import onnxq`` stays free of onnxruntime; see :mod:`onnxq.analysis.analyzer`.
"""

from typing import Any

from onnxq.analysis.inspect import LayerStats, ModelSummary, inspect_model

__all__ = [
    "AnalysisConfig",
    "AnalysisResult",
    "LayerStats",
    "ModelSummary",
    "analyze",
    "inspect_model",
]

_LAZY = {"analyze", "AnalysisConfig", "AnalysisResult"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from onnxq.analysis import analyzer

        return getattr(analyzer, name)
    raise AttributeError(f"module 'onnxq.analysis' has no attribute '{name}'")

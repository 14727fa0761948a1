"""ReplaceRelu6WithRelu: turn ``Clip(x, 0, 6)`` (ReLU6) into ``Relu(x)``. NOT exact; opt-in only.

``Relu(x) = max(x, 0)`` equals ``Clip(x, 0, 6) = min(max(x, 0), 6)`` only where ``x ≤ 6``; above 6
the activation is no longer bounded, so **the model computes a different function**. Some
flows do this so that cross-layer equalization may rescale channels (ReLU is positively
homogeneous, ReLU6 is not), hoping that fine-tuning or the data keep activations below 6. It can
cost a lot: replacing every Clip(0, 6) of EfficientNet-Lite0 with ReLU took top-1 accuracy from
0.884 to 0.644 on 500 ImageNet images. Never part of a default pipeline; each run logs a
WARNING with the number of Clips replaced.

Matches ``Clip`` in the default domain whose bounds are known and exactly ``min = 0`` and
``max = 6``, in both forms: attributes (opset < 11) and constant scalar inputs (opset ≥ 11),
read through :func:`onnxq.passes._graph.clip_bounds`. Any other Clip (other bounds, a missing
or non-constant bound, a non-float input) is skipped with a reason. The Relu takes the Clip's
node name and output name; bound constants left unused are removed by Cleanup.
"""

from __future__ import annotations

__all__ = ["ReplaceRelu6WithRelu"]

import logging

import onnx_ir as ir

from onnxq.passes._graph import clip_bounds, is_op
from onnxq.passes.base import OnnxqPass

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


class ReplaceRelu6WithRelu(OnnxqPass):
    """Replace ReLU6 (``Clip(0, 6)``) by ``Relu``; changes the model's function (opt-in)."""

    name = "replace-relu6"
    verb = "replaced"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if self.report.changed:
            logger.warning(
                "%s: replaced %d Clip(0, 6) with Relu; the model's function changed "
                "(activations above 6 are no longer clipped)",
                self.name,
                self.report.changed,
            )
        return result

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        modified = False
        for node in list(graph):
            if not is_op(node, "Clip") or node.graph is not graph:
                continue
            reason = _relu6_problem(node)
            if reason is not None:
                self.skip(node, reason)
                continue
            _replace(graph, node)
            self.changed()
            modified = True
        return modified


def _relu6_problem(node: ir.Node) -> str | None:
    bounds = clip_bounds(node)
    if isinstance(bounds, str):
        return bounds
    lo, hi = bounds
    if lo != 0.0 or hi != 6.0:
        return f"Clip({lo}, {hi}) is not Clip(0, 6)"
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return "Clip has no input"
    if x.dtype is not None and x.dtype not in _FLOAT_TYPES:
        return f"Clip input has dtype {x.dtype}"
    return None


def _replace(graph: ir.Graph, clip: ir.Node) -> None:
    old = clip.outputs[0]
    relu = ir.node("Relu", inputs=[clip.inputs[0]], name=clip.name)
    new = relu.outputs[0]
    new.shape, new.type = old.shape, old.type
    graph.insert_before(clip, relu)
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(clip, safe=True)
    old.name = None
    new.name = name

"""LiftConstants: turn constant tensors held in ``Constant`` nodes into initializers.

PaddleOCR and other exporters keep every weight in a ``Constant`` node, so a pass that looks for
weights among initializers finds none. After this pass every constant input is an initializer
(``Value.const_value`` set) and the other passes see one form only. Exact: the value of each
tensor is unchanged, only where it is stored moves.

Initializers that are also listed as graph inputs (IR < 4 exports) are overridable inputs, not
constants, for onnxruntime; with ``drop_initializer_inputs`` (the default) they are removed from
the input list so that they count as weights. Both steps are onnx-ir's own passes; this file only
names them for pipelines and reports what they did.
"""

from __future__ import annotations

__all__ = ["LiftConstants"]

import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveInitializersFromInputsPass,
)

from onnxq.passes.base import OnnxqPass


class LiftConstants(OnnxqPass):
    name = "lift-constants"
    verb = "lifted"

    def __init__(self, size_limit: int = 0, drop_initializer_inputs: bool = True) -> None:
        super().__init__()
        self.size_limit = size_limit
        self.drop_initializer_inputs = drop_initializer_inputs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _count_constants(model)
        result = LiftConstantsToInitializersPass(
            lift_all_constants=True, size_limit=self.size_limit
        )(model)
        modified = result.modified
        self.changed(before - _count_constants(model))
        if self.drop_initializer_inputs:
            modified |= RemoveInitializersFromInputsPass()(model).modified
        return ir.passes.PassResult(model, modified)


def _count_constants(model: ir.Model) -> int:
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
    )

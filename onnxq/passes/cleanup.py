"""Cleanup: the tail of every pipeline.

Removes nodes and initializers nothing reads (a BN fold leaves four orphan parameters per BN),
sorts the graph topologically and makes node and value names unique. Exact by construction: no
computation that reaches an output changes. Built from onnx-ir's tested passes.
"""

from __future__ import annotations

__all__ = ["Cleanup"]

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, TopologicalSortPass

from onnxq.passes.base import OnnxqPass


class Cleanup(OnnxqPass):
    name = "cleanup"
    verb = "removed"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _size(model)
        modified = RemoveUnusedNodesPass()(model).modified
        self.changed(before - _size(model))
        modified |= TopologicalSortPass()(model).modified
        modified |= NameFixPass()(model).modified
        return ir.passes.PassResult(model, modified)


def _size(model: ir.Model) -> int:
    return sum(len(g) + len(g.initializers) for g in model.graphs())

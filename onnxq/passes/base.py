"""The contract every onnxq pass follows.

A pass is an onnx-ir ``InPlacePass``: ``call(model)`` edits the model and returns
``PassResult(model, modified)`` with ``modified`` true only when something changed. A site where
the rule does not apply is a *reason*, not an exception: it is recorded with :meth:`skip`
(logged at DEBUG) and summarized at INFO when the pass ends, e.g.
``fold-bn: 49 folded, 1 skipped (1× 'scale' is a graph input)``. The last run's counts are kept
in :attr:`OnnxqPass.report` for callers and tests.
"""

from __future__ import annotations

__all__ = ["OnnxqPass", "PassReport"]

import dataclasses
import logging
from collections import Counter

import onnx_ir as ir

logger = logging.getLogger("onnxq.passes")


@dataclasses.dataclass
class PassReport:
    """What one run of a pass did: sites changed and sites skipped with their reasons."""

    name: str = ""
    verb: str = "changed"
    changed: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.skipped)

    def summary(self) -> str:
        text = f"{self.name}: {self.changed} {self.verb}"
        if self.skipped:
            top = ", ".join(f"{n}x {r}" for r, n in self.reasons().most_common(4))
            text += f", {len(self.skipped)} skipped ({top})"
        return text


class OnnxqPass(ir.passes.InPlacePass):
    """Base class: a named in-place pass that records changed and skipped sites."""

    #: name used in pipelines, recipes and the CLI
    name: str = ""
    #: past participle used in the summary line ("folded", "equalized")
    verb: str = "changed"

    def __init__(self) -> None:
        super().__init__()
        self.report = PassReport(self.name, self.verb)

    def __call__(self, model_or_result):  # reset the report for every run
        self.report = PassReport(self.name, self.verb)
        result = super().__call__(model_or_result)
        if self.report.changed or self.report.skipped:
            logger.info("%s", self.report.summary())
        return result

    def skip(self, node: ir.Node | None, reason: str) -> None:
        """Record that the rule did not apply at ``node`` and why."""
        where = node.name if node is not None and node.name else "<unnamed>"
        logger.debug("%s: skip %s: %s", self.name, where, reason)
        self.report.skipped.append((where, reason))

    def changed(self, count: int = 1) -> None:
        self.report.changed += count

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in list(model.graphs()):
            modified |= self.run_on_graph(model, graph)
        return ir.passes.PassResult(model, modified)

    def run_on_graph(self, model: ir.Model, graph: ir.Graph) -> bool:
        """Rewrite one graph (the main graph and each subgraph in turn); True if it changed."""
        raise NotImplementedError

"""ReplaceRelu6WithRelu: Clip(0, 6) in both forms becomes Relu, other Clips stay, a WARNING."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from conftest import model_from_text

from onnxq.passes.cleanup import Cleanup
from onnxq.passes.replace_relu6 import ReplaceRelu6WithRelu
from onnxq.runtime import run

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'

ATTRIBUTE_FORM = HEADER.format(opset=6) + (
    "g (float[N,4] x) => (float[N,4] y) <float[4,4] w> {{\n"
    "  t = MatMul (x, w)\n  y = Clip <min = {lo}, max = {hi}> (t)\n}}"
)
INPUT_FORM = HEADER.format(opset=13) + (
    "g (float[N,4] x) => (float[N,4] y) <float[4,4] w, float lo, float hi> {\n"
    "  t = MatMul (x, w)\n  y = Clip (t, lo, hi)\n}"
)


def attribute_form(lo: float = 0.0, hi: float = 6.0) -> ir.Model:
    return model_from_text(ATTRIBUTE_FORM.format(lo=lo, hi=hi))


def input_form(lo: float = 0.0, hi: float = 6.0) -> ir.Model:
    return model_from_text(INPUT_FORM, lo=np.float32(lo), hi=np.float32(hi))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


@pytest.mark.parametrize(
    "build", [attribute_form, input_form], ids=["opset6-attrs", "opset13-inputs"]
)
def test_relu6_becomes_relu(build, caplog):
    ref, model = build(), build()
    pass_ = ReplaceRelu6WithRelu()
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        result = pass_(model)
    assert result.modified
    assert pass_.report.changed == 1 and not pass_.report.skipped
    assert ops(model) == ["MatMul", "Relu"]
    assert model.graph.outputs[0].name == "y"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "replaced 1" in warnings[0].getMessage()
    assert "function changed" in warnings[0].getMessage()

    # equal where the activation stays at or below 6 ...
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 4)).astype(np.float32)
    (a,), (b,) = run(ref, {"x": x}), run(model, {"x": x})
    assert np.abs(a).max() <= 6
    np.testing.assert_array_equal(a, b)
    # ... and no longer clipped above it: the model's function changed
    (a,), (b,) = run(ref, {"x": 100 * x}), run(model, {"x": 100 * x})
    assert a.max() == 6 and b.max() > 6


def test_cleanup_removes_the_clip_bounds():
    model = input_form()
    ReplaceRelu6WithRelu()(model)
    Cleanup()(model)
    assert set(model.graph.initializers) == {"w"}


@pytest.mark.parametrize(
    "model, reason",
    [
        (lambda: attribute_form(hi=6.5), "Clip(0.0, 6.5) is not Clip(0, 6)"),
        (lambda: input_form(hi=6.5), "Clip(0.0, 6.5) is not Clip(0, 6)"),
        (lambda: input_form(lo=-1.0), "Clip(-1.0, 6.0) is not Clip(0, 6)"),
    ],
    ids=["attrs-0-6.5", "inputs-0-6.5", "inputs-minus1-6"],
)
def test_other_clips_are_skipped(model, reason, caplog):
    model = model()
    before = serialized(model)
    pass_ = ReplaceRelu6WithRelu()
    with caplog.at_level(logging.WARNING, logger="onnxq"):
        result = pass_(model)
    assert not result.modified
    assert pass_.report.changed == 0
    assert [r for _, r in pass_.report.skipped] == [reason]
    assert serialized(model) == before
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_clip_without_max_is_skipped():
    text = HEADER.format(opset=13) + (
        "g (float[N,4] x) => (float[N,4] y) <float lo> {\n  y = Clip (x, lo)\n}"
    )
    model = model_from_text(text, lo=np.float32(0))
    pass_ = ReplaceRelu6WithRelu()
    assert not pass_(model).modified
    assert [r for _, r in pass_.report.skipped] == ["Clip(0.0, None) is not Clip(0, 6)"]


def test_clip_with_fed_bound_is_skipped():
    text = HEADER.format(opset=13) + (
        "g (float[N,4] x, float hi) => (float[N,4] y) <float lo> {\n  y = Clip (x, lo, hi)\n}"
    )
    model = model_from_text(text, lo=np.float32(0))
    pass_ = ReplaceRelu6WithRelu()
    assert not pass_(model).modified
    assert [r for _, r in pass_.report.skipped] == ["Clip bound 'hi' is not a constant"]


def test_integer_clip_is_skipped():
    text = HEADER.format(opset=13) + (
        "g (int32[N,4] x) => (int32[N,4] y) <int32 lo, int32 hi> {\n  y = Clip (x, lo, hi)\n}"
    )
    model = model_from_text(text, lo=np.int32(0), hi=np.int32(6))
    pass_ = ReplaceRelu6WithRelu()
    assert not pass_(model).modified
    assert "dtype" in pass_.report.skipped[0][1]


def test_replaces_inside_if_branch_and_counts_all():
    text = HEADER.format(opset=13) + (
        "g (bool c, float[N,4] x) => (float[N,4] y) <float lo, float hi> {\n"
        "  r = Clip (x, lo, hi)\n"
        "  y = If (c) <\n"
        "    then_branch = t () => (float[N,4] yt) { yt = Clip (r, lo, hi) },\n"
        "    else_branch = e () => (float[N,4] ye) { ye = Identity (r) }\n"
        "  >\n}"
    )
    model = model_from_text(text, lo=np.float32(0), hi=np.float32(6))
    pass_ = ReplaceRelu6WithRelu()
    assert pass_(model).modified
    assert pass_.report.changed == 2
    assert [n.op_type for g in model.graphs() for n in g].count("Clip") == 0
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    (y,) = run(model, {"c": np.array(True), "x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))

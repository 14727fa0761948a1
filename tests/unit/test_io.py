"""load/save: every input form, atomic writes, overwrite safety, clear errors on bad files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import model_from_text, random_feeds

import onnxq
from onnxq.errors import ModelLoadError, ModelSaveError
from onnxq.runtime import run

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y) <float[4,3,3,3] w, float[4] b> {
  y = Conv<pads=[1,1,1,1]>(x, w, b)
}"""


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    ir.save(model_from_text(TEXT), path)
    return path


def test_every_input_form(model_path):
    proto = onnx.load(model_path)
    forms = [model_path, str(model_path), proto.SerializeToString(), proto, ir.load(model_path)]
    feeds = random_feeds(model_from_text(TEXT))
    ref = run(onnxq.load(model_path), feeds)[0]
    for form in forms:
        model = onnxq.load(form)
        assert isinstance(model, ir.Model)
        np.testing.assert_array_equal(run(model, feeds)[0], ref)


def test_graphsurgeon_graph(model_path):
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(onnx.load(model_path))
    assert isinstance(onnxq.load(graph), ir.Model)


def test_optimize_leaves_an_ir_input_unchanged(model_path):
    model = ir.load(model_path)
    before = model.graph.initializers["w"].const_value.numpy().copy()
    out = onnxq.optimize(model, passes=["cle"])
    assert out is not model
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), before)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "not a valid ONNX model"),
        (b"hello, I am not a model at all\n" * 3, "not a valid ONNX model"),
    ],
)
def test_not_onnx(tmp_path, content, words):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=words) as info:
        onnxq.load(path)
    assert str(path) in str(info.value)


def test_truncated(tmp_path, model_path):
    data = model_path.read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="trunc.onnx"):
        onnxq.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxq.load(tmp_path / "nope.onnx")


def test_external_data_round_trip_and_missing_file(tmp_path):
    model = model_from_text(TEXT)
    path = tmp_path / "ext.onnx"
    onnxq.save(model, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    loaded = onnxq.load(path)
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run(loaded, feeds)[0], run(model, feeds)[0])
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelLoadError, match="external data file 'ext.onnx.data'"):
        onnxq.load(path)


def test_truncated_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnxq.save(model_from_text(TEXT), path, external_data=True)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ModelLoadError, match="truncated"):
        onnxq.load(path)


def test_refuses_to_overwrite_its_input(model_path):
    model = onnxq.load(model_path)
    before = model_path.read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        onnxq.save(model, model_path)
    assert model_path.read_bytes() == before
    onnxq.save(model, model_path, overwrite=True)  # told to: allowed


def test_overwrite_external_input_in_place(tmp_path):
    path = tmp_path / "ext.onnx"
    onnxq.save(model_from_text(TEXT), path, external_data=True)
    model = onnxq.optimize(path, passes=["cle"])
    with pytest.raises(ModelSaveError):
        onnxq.save(model, path)
    onnxq.save(model, path, overwrite=True)
    again = onnxq.load(path)
    feeds = random_feeds(again)
    np.testing.assert_allclose(run(again, feeds)[0], run(model, feeds)[0])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = model_from_text(TEXT)
    dest = tmp_path / "out.onnx"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(ModelSaveError, match="disk full"):
        onnxq.save(model, dest)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_directory_is_an_error(tmp_path):
    with pytest.raises(ModelSaveError, match="directory"):
        onnxq.save(model_from_text(TEXT), tmp_path)

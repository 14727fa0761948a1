"""Encodings: AIMET offset convention, 1.0.0 and 2.0.0 files, exact round trip."""

import json

import numpy as np
import pytest
from conftest import model_from_text

from onnxq.errors import ConfigError
from onnxq.quant.encodings import read_encodings
from onnxq.quant.insert_qdq import Encoding
from onnxq.quant.qparams import affine_params
from onnxq.quant.sim import quantize, quantize_with_encodings
from onnxq.runtime import run

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5,8,8] y) <float[6,3,3,3] w1, float[6] b1, float[5,6,1,1] w2, float[5] b2> {
  a = Conv<pads=[1,1,1,1]>(x, w1, b1)
  r = Relu(a)
  y = Conv(r, w2, b2)
}"""


def test_aimet_offset_convention_by_hand():
    # range [-1, 3] on uint8: scale 4/255, zero point round(1/scale) = 64, AIMET offset -64
    scale, zero, _ = affine_params(-1.0, 3.0, 8, symmetric=False)
    assert scale == pytest.approx(4 / 255) and int(zero) == 64
    e = Encoding("t", "activation", 8, False, False, (float(scale),), (int(zero),))
    assert e.offset == (-64,)
    # the grid's minimum is offset * scale
    assert e.offset[0] * e.scale[0] == pytest.approx(-64 * 4 / 255)


@pytest.mark.parametrize("config", ["default", "per-channel"])
@pytest.mark.parametrize("version", ["encodings", "encodings_v2"])
def test_round_trip_is_exact(tmp_path, config, version):
    model = model_from_text(TEXT)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    sim = quantize(model, calib, config=config)
    paths = sim.export(tmp_path, "m")
    rebuilt = quantize_with_encodings(sim.float_model, paths[version], config=config)
    a = {k: v.const_value.numpy() for k, v in sim.model.graph.initializers.items()}
    b = {k: v.const_value.numpy() for k, v in rebuilt.model.graph.initializers.items()}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    feeds = {"x": calib[0]}
    np.testing.assert_array_equal(run(sim.model, feeds)[0], run(rebuilt.model, feeds)[0])


def test_v1_file_has_aimet_fields(tmp_path):
    model = model_from_text(TEXT)
    calib = [np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)]
    sim = quantize(model, calib, config="per-channel")
    data = json.loads(sim.export(tmp_path, "m")["encodings"].read_text())
    act = {e["name"]: e for e in data["activation_encodings"]}
    assert {"name", "enc_type", "dtype", "bw", "is_sym", "scale", "offset"} <= set(act["x"])
    params = {e["name"]: e for e in data["param_encodings"]}
    assert params["w1"]["enc_type"] == "PER_CHANNEL" and len(params["w1"]["scale"]) == 6


def test_encodings_of_another_model_are_refused(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": []}))
    with pytest.raises(ConfigError, match="no entry"):
        quantize_with_encodings(model_from_text(TEXT), path)
    assert read_encodings(path) == {}

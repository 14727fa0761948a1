"""Calibration data: every accepted form, the casting rule, and a clear error for bad data."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.errors import ConfigError
from onnxq.runtime.data import ImageFolder, InputSpec, Preprocess, as_batches, input_specs

SPECS = [("x", np.float32, (None, 3, 4, 4))]
TWO = [("a", np.float32, (None, 2)), ("ids", np.int64, (None, 5))]


def _x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


class Reader:  # the onnxruntime CalibrationDataReader protocol
    def __init__(self, items):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def test_forms_of_in_memory_data():
    xs = [_x(1, 0), _x(2, 1), _x(3, 2)]
    dicts = [{"x": a} for a in xs]
    for data in (dicts, iter(dicts), (d for d in dicts), Reader(dicts), xs, tuple(xs)):
        out = list(as_batches(data, SPECS))
        assert [b["x"].shape[0] for b in out] == [1, 2, 3]
        assert all(set(b) == {"x"} for b in out)
    assert len(list(as_batches(xs[1], SPECS))) == 1  # a single array is one batch
    assert len(list(as_batches({"x": xs[1]}, SPECS))) == 1  # so is a single dict


def test_folder_of_npy_and_npz_in_name_order(tmp_path):
    np.save(tmp_path / "b.npy", _x(2, 1))
    np.savez(tmp_path / "a.npz", x=_x(1, 0))
    np.savez(tmp_path / "c.npz", _x(3, 2))  # one unnamed array: fine for a single-input model
    (tmp_path / "notes.txt").write_text("ignored")
    out = list(as_batches(tmp_path, SPECS))
    assert [b["x"].shape[0] for b in out] == [1, 2, 3]
    assert len(list(as_batches(str(tmp_path / "b.npy"), SPECS))) == 1


def test_casting_rule():
    b = next(as_batches([{"a": np.zeros((1, 2)), "ids": np.arange(5, dtype=np.int32)[None]}], TWO))
    assert b["a"].dtype == np.float32 and b["ids"].dtype == np.int64
    b = next(as_batches([{"a": [[1.0, 2.0]], "ids": [[1, 2, 3, 4, 5]]}], TWO))  # lists too
    assert b["a"].dtype == np.float32 and b["ids"].dtype == np.int64
    with pytest.raises(ConfigError, match=r"input 'x' is uint8 but the model expects float32"):
        next(as_batches([(_x() * 50).astype(np.uint8)], SPECS))
    with pytest.raises(ConfigError, match=r"input 'ids' is float64 but the model expects int64"):
        next(as_batches([{"a": np.zeros((1, 2)), "ids": np.zeros((1, 5))}], TWO))
    with pytest.raises(ConfigError, match=r"input 'ids' has int64 values outside the range"):
        next(
            as_batches(
                [{"a": np.zeros((1, 2)), "ids": np.full((1, 5), 2**40)}],
                [TWO[0], ("ids", np.int32, (None, 5))],
            )
        )


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"x": _x(), "y": _x()}, r"batch 1: unknown input 'y'; the model inputs are 'x'"),
        ({}, r"batch 1: input 'x' is missing"),
        (
            {"x": _x()[0]},
            r"input 'x' has shape \(3, 4, 4\) \(rank 3\) but the model expects rank 4",
        ),
        ({"x": np.zeros((2, 3, 5, 4), np.float32)}, r"input 'x' has shape .* \(\?, 3, 4, 4\)"),
        ({"x": np.zeros((2, 4, 4, 3), np.float32)}, r"input 'x' .*NHWC layout\?"),
        ({"x": np.zeros((0, 3, 4, 4), np.float32)}, r"input 'x' is empty"),
        ({"x": np.where(_x() > 1, np.nan, _x())}, r"input 'x' has \d+ NaN and 0 infinite"),
        ({"x": np.where(_x() > 1, np.inf, _x())}, r"input 'x' has 0 NaN and \d+ infinite"),
        ({"x": "a string"}, r"input 'x' is <U8 but the model expects float32"),
    ],
)
def test_bad_batches_name_the_input_and_batch(batch, message):
    data = [{"x": _x()}, batch]
    it = as_batches(data, SPECS)
    next(it)
    with pytest.raises(ConfigError, match=message) as info:
        next(it)
    assert str(info.value).startswith("calibration batch 1: ")
    assert "\n" not in str(info.value)


def test_bad_sources():
    with pytest.raises(ConfigError, match=r"no batches \(model inputs: 'x'\)"):
        list(as_batches([], SPECS))
    with pytest.raises(ConfigError, match=r"no batches"):
        list(as_batches(Reader([]), SPECS))
    with pytest.raises(
        ConfigError, match=r"single-input models; this model has 2 inputs \('a', 'ids'\)"
    ):
        list(as_batches([np.zeros((1, 2))], TWO))
    with pytest.raises(ConfigError, match=r"batch 0: expected a dict"):
        list(as_batches([3], SPECS))
    with pytest.raises(ConfigError, match=r"cannot read calibration data from a int"):
        list(as_batches(3, SPECS))
    with pytest.raises(ConfigError, match=r"does not exist"):
        list(as_batches("/nonexistent/calib", SPECS))


def test_bad_folders(tmp_path):
    with pytest.raises(ConfigError, match=r"no .npy or .npz files"):
        list(as_batches(tmp_path, SPECS))
    np.savez(tmp_path / "a.npz", a=np.zeros((1, 2), np.float32), idz=np.zeros((1, 5), np.int64))
    with pytest.raises(ConfigError, match=r"file 'a.npz': unknown input 'idz'"):
        list(as_batches(tmp_path, TWO))
    np.save(tmp_path / "b.npy", np.zeros((1, 2), np.float32))
    (tmp_path / "a.npz").unlink()
    with pytest.raises(ConfigError, match=r"file 'b.npy': .npy files only work for single-input"):
        list(as_batches(tmp_path, TWO))
    (tmp_path / "b.npy").unlink()
    (tmp_path / "c.npy").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"file 'c.npy': cannot read it"):
        list(as_batches(tmp_path, SPECS))


def test_input_specs_from_model():
    from conftest import model_from_text

    m = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x, int64[2] ids) => (float[N,3] y) { y = Relu(x) }""")
    assert input_specs(m) == [
        InputSpec("x", np.dtype(np.float32), (None, 3)),
        InputSpec("ids", np.dtype(np.int64), (2,)),
    ]
    assert len(list(as_batches([{"x": np.ones((4, 3)), "ids": [1, 2]}], m))) == 1


def test_preprocess_from_string():
    p = Preprocess.from_string("resize=256,crop=224,mean=127,std=128,layout=NCHW,color=RGB")
    assert (p.resize_shorter, p.center_crop, p.mean, p.std) == (256, (224, 224), (127.0,), (128.0,))
    p = Preprocess.from_string("imagenet,layout=nhwc,batch=4,resize=300x200")
    assert p.scale == pytest.approx(1 / 255) and p.mean == (0.485, 0.456, 0.406)
    assert (p.layout, p.batch_size, p.resize, p.resize_shorter) == ("NHWC", 4, (300, 200), None)
    for bad, msg in [
        ("size=3", "unknown key 'size'"),
        ("layout=NCWH", "layout must be"),
        ("color=L,mean=1/2/3", "mean needs 1 or 1 values"),
        ("crop", "not key=value"),
        ("resize=abc", "bad value"),
        ("fancy", "unknown preset 'fancy'"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            Preprocess.from_string(bad)


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = []
    for i in range(3):
        arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
        pixels.append(arr)
        (tmp_path / "sub").mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / ("sub" if i else ".") / f"{i}.png")
    p = Preprocess.from_string("crop=8x10,mean=100,std=50,batch=2")
    folder = ImageFolder(tmp_path, p)
    batches = list(folder)
    assert len(folder) == 2 and [b.shape for b in batches] == [(2, 3, 8, 10), (1, 3, 8, 10)]
    np.testing.assert_allclose(
        batches[0][0], (pixels[0][1:9, 1:11].transpose(2, 0, 1) - 100.0) / 50, rtol=1e-6
    )
    bgr = next(iter(ImageFolder(tmp_path, "crop=8x10,layout=NHWC,color=BGR", limit=1)))
    np.testing.assert_array_equal(bgr[0], pixels[0][1:9, 1:11, ::-1])
    gray = next(iter(ImageFolder(tmp_path, "resize=5x6,color=L")))
    assert gray.shape == (1, 1, 5, 6)
    out = list(
        as_batches(
            ImageFolder(tmp_path, p, drop_last=True), [("img", np.float32, (None, 3, 8, 10))]
        )
    )
    assert len(out) == 1 and out[0]["img"].shape == (2, 3, 8, 10)
    with pytest.raises(ConfigError, match=r"crop 20x20 is larger than the resized image 10x12"):
        list(ImageFolder(tmp_path, "crop=20"))
    with pytest.raises(ConfigError, match="no images"):
        ImageFolder(tmp_path / "sub", limit=0)


def test_onnxruntime_calibration_data_reader_works_as_is():
    from onnxruntime.quantization import CalibrationDataReader

    class OrtReader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": _x(1, i)} for i in range(3)])

        def get_next(self):
            return next(self.items, None)

    assert len(list(as_batches(OrtReader(), SPECS))) == 3


def test_negative_dimensions_are_dynamic():
    """PaddlePaddle exports declare the batch as -1: any batch size is accepted."""
    from tests.conftest import model_from_text

    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (float[-1,3,4,4] x) => (float[-1,3,4,4] y) { y = Relu (x) }""")
    specs = input_specs(model)
    assert specs[0].shape == (None, 3, 4, 4)
    assert [b["x"].shape[0] for b in as_batches([_x(2), _x(5)], specs)] == [2, 5]

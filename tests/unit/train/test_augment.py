"""The training loop's image augmentation: random resized crop and mixup ("match")."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxq.train.loop import _augment, _mixing, _resized_crop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ramp(n: int = 4, h: int = 32, w: int = 32) -> torch.Tensor:
    """x[..., i, j] = j / w on channel 0, i / h on channel 1 (pixel centres)."""
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    img = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)])
    return img.expand(n, 2, h, w).clone()


def test_full_area_square_crop_is_the_identity() -> None:
    x = torch.randn(3, 3, 16, 16)
    got = _resized_crop(x, torch.Generator().manual_seed(0), area=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(got, x, atol=1e-5)


def test_crop_of_a_ramp_is_a_steeper_ramp_inside_the_image() -> None:
    # a crop of area a and aspect 1 spans sqrt(a) of each side: the ramp's slope grows by 1/sqrt(a)
    x = ramp()
    got = _resized_crop(x, torch.Generator().manual_seed(1), area=(0.25, 0.25), ratio=(1.0, 1.0))
    for c, axis in ((0, -1), (1, -2)):
        step = torch.diff(got[:, c], dim=axis)
        assert torch.allclose(step, torch.full_like(step, 0.5 / 32), atol=1e-5)
        lo, hi = got[:, c].amin(dim=(1, 2)), got[:, c].amax(dim=(1, 2))
        assert bool(((lo >= 0) & (hi <= 1)).all())
        assert torch.allclose(hi - lo, torch.full_like(hi, 0.5 * 31 / 32), atol=1e-5)
    # crops differ between samples (one draw per sample)
    assert len({round(float(v), 4) for v in got[:, 0, 0, 0]}) > 1


def test_match_mixes_each_image_with_its_partner() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(6, 3, 16, 16) + torch.arange(6, dtype=torch.float32)[:, None, None, None]
    lam, partner = _mixing(6, gen)
    got = _augment(x, "match", 0.0, gen, (lam, partner))  # constant images: crop/flip change nothing
    want = lam * torch.arange(6.0) + (1 - lam) * partner.to(torch.float32)
    assert torch.allclose(got[:, :, 5, 7].T, want.expand(3, 6), atol=1e-5)
    assert got.shape == x.shape and got.is_contiguous()


def test_match_is_repeatable_for_a_seed() -> None:
    x = torch.randn(4, 3, 20, 20)

    def draw(seed: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        return _augment(x, "match", 0.0, gen, _mixing(4, gen)).numpy()

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.allclose(draw(3), draw(4))

"""An importable evaluation function for the compression sweep tests (workers load it by path)."""

from __future__ import annotations

import numpy as np


def mean_logit(session) -> dict[str, float]:
    """A user's metric on fixed inputs: the mean |logit| (any number serves the plumbing)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 12, 12)).astype(np.float32)
    return {"m": float(np.abs(session.run(None, {"x": x})[0]).mean()), "other": 1.0}

"""Build onnxruntime sessions straight from an ``onnx_ir.Model``.

Graph optimizations are off by default so that what runs is exactly the graph onnxq built (tests
compare models this way); ``optimize=True`` gives onnxruntime's full optimization level, as a user
deploying the model would run it. Models above the protobuf limit go through a temporary file
with external data.
"""

from __future__ import annotations

__all__ = ["create_session", "run"]

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxq.io import PROTOBUF_LIMIT_BYTES, internalized, weight_bytes


def create_session(
    model: ir.Model, *, optimize: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if weight_bytes(model) <= PROTOBUF_LIMIT_BYTES:
        with internalized(model):
            data = ir.to_proto(model).SerializeToString()
        return ort.InferenceSession(data, options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="onnxq-session-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(path, options, providers=providers)


def run(
    model: ir.Model | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    optimize: bool = False,
) -> list[np.ndarray]:
    """Run ``model`` once on ``feeds`` and return every graph output."""
    session = model if isinstance(model, ort.InferenceSession) else create_session(
        model, optimize=optimize
    )
    return session.run(None, dict(feeds))

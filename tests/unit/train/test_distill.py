"""Distillation of a float model (compression fine-tuning): outputs, and shared intermediate tensors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_classifier_text, model_from_text, random_feeds

torch = pytest.importorskip("torch")

from onnxq.compress.channel_pruning import ChannelPruning
from onnxq.passes.cleanup import Cleanup
from onnxq.runtime import run
from onnxq.train import TrainConfig, distill
from onnxq.train.loop import _with_outputs, shared_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = conv_classifier_text(16)


@pytest.fixture()
def pair():
    teacher = model_from_text(TEXT, seed=1)
    for i, node in enumerate(teacher.graph):
        node.name = f"{node.op_type.lower()}{i}"
    data = [random_feeds(teacher, seed=i, batch=16) for i in range(4)]
    student = teacher.clone()
    ChannelPruning(keep={"conv2": 4}, data=data)(student)  # conv2 keeps 4 of 16 inputs: 'a' shrinks
    Cleanup()(student)
    return teacher, student, data


def test_shared_features_are_the_same_name_and_shape_in_both(pair):
    teacher, student, data = pair
    names = shared_features(student, teacher, {"x": data[0]["x"][:1]})
    assert names == ["c", "d"]  # 'a' has 4 channels left, 'y' is a graph output


def test_feature_distillation_pulls_the_shared_tensors_toward_the_teacher():
    # the student is the teacher with noisy first layers: every tensor is shared; on the outputs
    # alone the intermediate tensors are not identified, with them they move toward the teacher
    from onnxq.passes._graph import set_constant

    teacher = model_from_text(TEXT, seed=1)
    data = [random_feeds(teacher, seed=i, batch=16) for i in range(4)]
    noisy = teacher.clone()
    rng = np.random.default_rng(0)
    for name in ("w1", "w2"):
        value = noisy.graph.initializers[name]
        w = value.const_value.numpy()
        set_constant(value, w + 0.5 * w.std() * rng.standard_normal(w.shape).astype(np.float32))

    def gap(model):  # normalized MSE of the shared tensor 'c' on the training samples
        pairs = [(run(_with_outputs(model, ["c"]), f)[1], run(_with_outputs(teacher, ["c"]), f)[1]) for f in data]
        return float(np.mean([np.mean((s - t) ** 2) / np.var(t) for s, t in pairs]))

    cfg = TrainConfig(epochs=10, lr=3e-3, batch_size=16, progress=False, augment="none")
    outputs_only, features = noisy.clone(), noisy.clone()
    distill(outputs_only, teacher, data, cfg)
    tuned, info = distill(features, teacher, data, cfg, features=True, feature_weight=1000.0)
    assert info["status"] == "done" and info["features"] == 3 and tuned is features
    assert [o.name for o in features.graph.outputs] == ["y"]  # anchors were exposed on copies only
    assert gap(features) < 0.8 * gap(outputs_only)
    assert gap(features) < 0.8 * gap(noisy)


def test_match_augmentation_and_labels_train_a_float_model(pair):
    teacher, student, data = pair
    labels = np.argmax(np.concatenate([run(teacher, f)[0] for f in data]), 1)
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False, augment="match")
    _, info = distill(student, teacher, data, cfg, labels=labels)
    assert info["status"] == "done" and np.isfinite(info["history"][-1]["loss"])

"""The numpy trainer: same forward pass as ONNX Runtime, right gradients, a useful update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from inference.complexity import features
from inference.router_training import (
    Array,
    Network,
    TrainingParams,
    gradients,
    read_network,
    targets,
    train_version,
    version_of,
    weighted_bce,
    write_network,
)
from topology.settings import Settings

PROMPTS = [f"reverse {word}=" for word in ("abc", "hello", "stream", "kafka", "zyxw")] + [
    f"add {a}+{b}=" for a, b in ((1, 2), (35, 7), (120, 44), (9, 9))
]


@pytest.fixture(scope="module")
def base() -> bytes:
    return (Path(str(Settings().route.classifier)) / "model.onnx").read_bytes()


def run_onnx(onnx_bytes: bytes, x: Array) -> Array:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (p,) = session.run(None, {"features": x})
    return np.asarray(p)


def test_numpy_forward_equals_onnxruntime(base: bytes) -> None:
    x = features(PROMPTS)
    assert np.allclose(read_network(base).predict(x), run_onnx(base, x), atol=1e-5)


def test_gradients_match_finite_differences(base: bytes) -> None:
    network = read_network(base)
    x = features(PROMPTS).astype(np.float64)
    model = np.array([0, 1] * 4 + [0])
    label = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1], np.float64)
    target, weight = targets(network, x, model, label, keep_weight=0.5)
    analytic = gradients(network, x, target, weight)
    rng = np.random.default_rng(0)
    for layer in range(len(network.layers)):
        matrix = network.layers[layer][0].astype(np.float64)
        network.layers[layer] = (matrix, network.layers[layer][1])
        for _ in range(3):
            i, j = (int(rng.integers(n)) for n in matrix.shape)
            saved = matrix[i, j]
            matrix[i, j] = saved + 1e-6
            up = weighted_bce(network, x, target, weight)
            matrix[i, j] = saved - 1e-6
            down = weighted_bce(network, x, target, weight)
            matrix[i, j] = saved
            assert analytic[2 * layer][i, j] == pytest.approx((up - down) / 2e-6, abs=1e-6)


def test_feedback_that_a_model_is_wrong_on_a_region_lowers_its_chance_there(base: bytes) -> None:
    reverse = features([p for p in PROMPTS if p.startswith("reverse")])
    add = features([p for p in PROMPTS if p.startswith("add")])
    before = read_network(base)
    # zoo-small (output 0) answered every reverse prompt wrong; add prompts stood.
    x = np.concatenate([reverse, add])
    model = np.zeros(len(x), np.int64)
    label = np.array([0.0] * len(reverse) + [1.0] * len(add))
    tuned = train_version(base, x, model, label, TrainingParams(steps=100, learning_rate=0.01))
    after = read_network(tuned)
    small_before, small_after = before.predict(reverse)[:, 0], after.predict(reverse)[:, 0]
    print(f"zoo-small on reverse: {small_before.mean():.3f} -> {small_after.mean():.3f}")
    assert small_before.mean() > 0.5
    assert (small_after < 0.2).all()
    assert after.predict(add)[:, 0].mean() >= before.predict(add)[:, 0].mean() - 0.05
    # zoo-large (output 1) was not labelled: it keeps its predictions.
    assert np.allclose(after.predict(x)[:, 1], before.predict(x)[:, 1], atol=0.05)
    assert version_of(tuned) != version_of(base)
    assert np.allclose(after.predict(x), run_onnx(tuned, x), atol=1e-5)


def test_write_then_read_round_trips_and_keeps_the_names(base: bytes) -> None:
    network = read_network(base)
    changed = Network(network.mean, network.std, [(w * 0.5, b + 0.1) for w, b in network.layers])
    written = write_network(base, changed)
    again = read_network(written)
    for (w0, b0), (w1, b1) in zip(changed.layers, again.layers, strict=True):
        assert np.array_equal(w0, w1) and np.array_equal(b0, b1)
    session = ort.InferenceSession(written, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["p_correct"]


def test_another_graph_is_refused() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ValueError, match="not the classifier's graph"):
        read_network(helper.make_model(graph).SerializeToString())

"""Incremental training of the router's complexity classifier from feedback, in numpy.

torch is only in the build venv (a multi-GB CUDA build that the runtime venv and CI cannot
afford), yet feedback arrives at run time. So the update works on the exported graph
itself: the weights are read from the ONNX initializers, trained with gradient steps
(Adam) of the binary cross-entropy on the one output a feedback event labels (the model
that answered), and written back into the same graph by replacing the initializers, input
and output names kept. The outputs an event does not label share the hidden layers, so
they would drift with it: their target is the incumbent's own prediction (self-
distillation, weighted `keep_weight`), which keeps what the feedback says nothing about.
The standardisation baked into the graph is left as built.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

Array = np.ndarray[Any, Any]
GRAPH_OPS = ["Sub", "Div", "Gemm", "Relu", "Gemm", "Relu", "Gemm", "Sigmoid"]


def version_of(onnx_bytes: bytes) -> str:
    """A router model's version id: the start of its SHA-256, the same on every worker."""
    return hashlib.sha256(onnx_bytes).hexdigest()[:12]


@dataclass
class Network:
    """The classifier's parameters: standardisation, then (weight [out, in], bias) layers
    with ReLU between them and a sigmoid per output."""

    mean: Array
    std: Array
    layers: list[tuple[Array, Array]]

    def logits(self, x: Array) -> tuple[Array, list[Array]]:
        """The output logits and each layer's input (for the backward pass)."""
        h = (x - self.mean) / self.std
        inputs = []
        for index, (weight, bias) in enumerate(self.layers):
            inputs.append(h)
            h = h @ weight.T + bias
            if index < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h, inputs

    def predict(self, x: Array) -> Array:
        """p_correct for each row and model, as the ONNX graph computes it."""
        z, _ = self.logits(np.asarray(x, np.float32))
        p: Array = 1.0 / (1.0 + np.exp(-z))
        return p.astype(np.float32)


def read_network(onnx_bytes: bytes) -> Network:
    """The parameters of a classifier graph as `models/classifier.py` exports it; ValueError
    for any other graph, which this trainer cannot update."""
    graph = onnx.load_from_string(onnx_bytes).graph
    ops = [node.op_type for node in graph.node]
    if ops != GRAPH_OPS:
        raise ValueError(f"not the classifier's graph: ops {ops}, expected {GRAPH_OPS}")
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    layers = []
    for node in graph.node:
        if node.op_type != "Gemm":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("transB", 0) != 1 or attributes.get("transA", 0) != 0:
            raise ValueError(f"Gemm {node.name} is not x @ W.T + b: {attributes}")
        layers.append((values[node.input[1]].copy(), values[node.input[2]].copy()))
    mean, std = (values[graph.node[i].input[1]].copy() for i in (0, 1))
    return Network(mean, std, layers)


def write_network(onnx_bytes: bytes, network: Network) -> bytes:
    """`onnx_bytes` with its Gemm weights and biases replaced by `network`'s."""
    model = onnx.load_from_string(onnx_bytes)
    gemms = [node for node in model.graph.node if node.op_type == "Gemm"]
    replaced = {}
    for node, (weight, bias) in zip(gemms, network.layers, strict=True):
        replaced[node.input[1]] = weight.astype(np.float32)
        replaced[node.input[2]] = bias.astype(np.float32)
    for init in model.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@dataclass(frozen=True)
class TrainingParams:
    steps: int = 200
    learning_rate: float = 0.01
    keep_weight: float = 1.0


def targets(
    network: Network, x: Array, model: Array, label: Array, keep_weight: float
) -> tuple[Array, Array]:
    """Per example and output, the target and its weight: the label (weight 1) where the
    example's model answered, the network's own prediction (`keep_weight`) elsewhere."""
    target = network.predict(x).astype(np.float64)
    weight = np.full(target.shape, keep_weight)
    rows = np.arange(len(target))
    target[rows, model], weight[rows, model] = label, 1.0
    return target, weight


def weighted_bce(network: Network, x: Array, target: Array, weight: Array) -> float:
    """Binary cross-entropy summed over weighted outputs, averaged over examples."""
    z, _ = network.logits(x)
    # log(1 + e^-|z|) + max(z, 0) - y z: BCE with logits, stable for large |z|.
    loss = np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0.0) - target * z
    return float((weight * loss).sum() / len(z))


def gradients(network: Network, x: Array, target: Array, weight: Array) -> list[Array]:
    """d weighted_bce / d (weight, bias) of every layer, in the order of `network.layers`."""
    z, inputs = network.logits(x)
    upstream = weight * (1.0 / (1.0 + np.exp(-z)) - target) / len(z)
    grads: list[Array] = []
    for index in range(len(network.layers) - 1, -1, -1):
        weight, _ = network.layers[index]
        h = inputs[index]
        grads[:0] = [upstream.T @ h, upstream.sum(axis=0)]
        upstream = (upstream @ weight) * (h > 0) if index > 0 else upstream
    return grads


def fine_tune(
    network: Network, x: Array, model: Array, label: Array, params: TrainingParams
) -> Network:
    """A copy of `network` after `params.steps` full-batch Adam steps on the examples:
    features `x` [n, F], the index of the model that answered [n], 1.0 right / 0.0 wrong."""
    x = np.asarray(x, np.float64)
    target, weight = targets(
        network, x, np.asarray(model, np.int64), np.asarray(label), params.keep_weight
    )
    tuned = Network(
        network.mean.astype(np.float64),
        network.std.astype(np.float64),
        [(w.astype(np.float64), b.astype(np.float64)) for w, b in network.layers],
    )
    flat = [p for layer in tuned.layers for p in layer]
    first = [np.zeros_like(p) for p in flat]
    second = [np.zeros_like(p) for p in flat]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, params.steps + 1):
        for param, grad, m, v in zip(
            flat, gradients(tuned, x, target, weight), first, second, strict=True
        ):
            m[...] = beta1 * m + (1 - beta1) * grad
            v[...] = beta2 * v + (1 - beta2) * grad**2
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
            param -= params.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    return Network(
        network.mean,
        network.std,
        [(w.astype(np.float32), b.astype(np.float32)) for w, b in tuned.layers],
    )


def train_version(
    onnx_bytes: bytes, x: Array, model: Array, label: Array, params: TrainingParams
) -> bytes:
    """The graph `onnx_bytes` fine-tuned on the examples, ready to load."""
    tuned = fine_tune(read_network(onnx_bytes), x, model, label, params)
    return write_network(onnx_bytes, tuned)

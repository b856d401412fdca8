"""The torch-free ONNX export of all-MiniLM-L6-v2: its interface, its cache, its accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from inference.encoder import MODEL_FILE, TOKENIZER_FILE, Encoder
from models.embedding import STAMP_FILE, ensure_embedding_model
from models.embedding_reference import REFERENCE
from topology.settings import Settings

MIN_COSINE = 0.999


@pytest.fixture(scope="session")
def model_folder() -> Path:
    return ensure_embedding_model(Path(Settings().embedding.path))


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REFERENCE.read_text())
    return data


def test_graph_takes_token_ids_and_gives_sentence_embeddings(model_folder: Path) -> None:
    model = onnx.load(str(model_folder / MODEL_FILE), load_external_data=False)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor in inputs.values():
        assert tensor.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor.shape.dim] == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "sentence_embedding"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = output.type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_value) == ("batch", 384)
    assert {p.key: p.value for p in model.metadata_props}["max_seq_length"] == "256"


def test_a_current_export_is_not_rebuilt(
    model_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = (model_folder / MODEL_FILE).stat().st_mtime_ns
    ensure_embedding_model(model_folder)
    assert "export skipped" in capsys.readouterr().out
    assert (model_folder / MODEL_FILE).stat().st_mtime_ns == written


def test_a_stale_stamp_makes_a_fresh_export(tmp_path: Path, model_folder: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(b"left over from an older exporter")
    (tmp_path / TOKENIZER_FILE).write_bytes((model_folder / TOKENIZER_FILE).read_bytes())
    stamp = json.loads((model_folder / STAMP_FILE).read_text())
    (tmp_path / STAMP_FILE).write_text(json.dumps({**stamp, "exporter": -1}))
    ensure_embedding_model(tmp_path)
    assert json.loads((tmp_path / STAMP_FILE).read_text()) == stamp
    assert (tmp_path / MODEL_FILE).read_bytes() == (model_folder / MODEL_FILE).read_bytes()


def test_reference_prompts_exercise_truncation(
    model_folder: Path, reference: dict[str, Any]
) -> None:
    tokenizer = Tokenizer.from_file(str(model_folder / TOKENIZER_FILE))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    lengths = [len(tokenizer.encode(p).ids) for p in reference["prompts"]]
    assert len(lengths) == 64
    assert min(lengths) < 16
    assert sum(n > 256 for n in lengths) >= 5


def test_export_matches_sentence_transformers(
    model_folder: Path, reference: dict[str, Any]
) -> None:
    expected = np.array(reference["embeddings"], dtype=np.float32)
    got = Encoder(model_folder, device="cpu").embed(reference["prompts"])
    cosines = np.sum(got * expected, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    worst = int(np.argmin(cosines))
    assert cosines[worst] >= MIN_COSINE, reference["prompts"][worst][:80]

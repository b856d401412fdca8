"""Encoder: batching, padding, chunking and clear errors for broken model folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from inference.encoder import MODEL_FILE, TOKENIZER_FILE, Encoder, length_groups
from inference.runtime import ModelLoadError
from models.embedding import ensure_embedding_model
from topology.settings import Settings

TEXTS = [
    "What is Kafka?",
    "Explain consumer groups in Apache Kafka, with an example of rebalancing. " * 40,
    "hi",
    "Write a haiku about stream processing and exactly-once delivery.",
    "",
    "Wie funktioniert ein Token-Bucket-Ratenbegrenzer?",
    "What is Kafka ?",
]


@pytest.fixture(scope="session")
def model_folder() -> Path:
    return ensure_embedding_model(Path(Settings().embedding.path))


@pytest.fixture(scope="session")
def encoder(model_folder: Path) -> Encoder:
    return Encoder(model_folder, device="cpu")


def test_embeddings_are_unit_rows_of_384_floats(encoder: Encoder) -> None:
    vectors = encoder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_no_texts_give_an_empty_array(encoder: Encoder) -> None:
    assert encoder.embed([]).shape == (0, 384)


def test_a_padded_batch_equals_one_text_at_a_time(encoder: Encoder) -> None:
    batched = encoder.embed(TEXTS)
    single = np.concatenate([encoder.embed([text]) for text in TEXTS])
    assert np.abs(batched - single).max() < 1e-4


def test_chunks_of_max_batch_equal_one_run(model_folder: Path, encoder: Encoder) -> None:
    small_batches = Encoder(model_folder, device="cpu", max_batch=2)
    assert np.abs(small_batches.embed(TEXTS) - encoder.embed(TEXTS)).max() < 1e-4


def test_near_duplicates_are_closer_than_unrelated_texts(encoder: Encoder) -> None:
    kafka, _, _, haiku, _, _, kafka_again = encoder.embed(TEXTS)
    assert float(kafka @ kafka_again) > 0.95
    assert float(kafka @ kafka_again) > float(kafka @ haiku) + 0.2


def test_length_groups_keep_long_texts_away_from_short_ones() -> None:
    lengths = [12, 256, 9, 14, 250, 10, 11, 13]
    groups = length_groups(lengths, max_batch=4)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert groups == [[2, 5, 6, 0], [7, 3], [4, 1]]
    assert length_groups([], max_batch=4) == []


def test_a_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / MODEL_FILE))):
        Encoder(tmp_path, device="cpu")


def test_a_corrupt_model_file_is_named(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / MODEL_FILE))):
        Encoder(tmp_path, device="cpu")


def test_a_missing_tokenizer_file_is_named(tmp_path: Path, model_folder: Path) -> None:
    (tmp_path / MODEL_FILE).symlink_to((model_folder / MODEL_FILE).resolve())
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / TOKENIZER_FILE))):
        Encoder(tmp_path, device="cpu")


def test_a_corrupt_tokenizer_file_is_named(tmp_path: Path, model_folder: Path) -> None:
    (tmp_path / MODEL_FILE).symlink_to((model_folder / MODEL_FILE).resolve())
    (tmp_path / TOKENIZER_FILE).write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / TOKENIZER_FILE))):
        Encoder(tmp_path, device="cpu")

"""Sentence embeddings from the exported all-MiniLM-L6-v2 (see `models.embedding`).

The graph pools and normalises itself, so this only tokenizes, groups texts of similar
length, pads each group to its longest text and runs the session once per group. Padding
to a fixed length, or one 256-token prompt among 31 short ones, would make every row pay
for the longest: on ShareGPT prompts that costs more than batching gains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from inference.runtime import Device, ModelLoadError, open_session, open_tokenizer

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT = "sentence_embedding"
WARM_UP_TEXT = "warm up"
# A group may hold at most this many times the tokens its texts really have.
MAX_PADDED_RATIO = 2


def length_groups(lengths: list[int], max_batch: int) -> list[list[int]]:
    """Indices of `lengths` in groups of at most `max_batch`, shortest first, cheap to pad."""
    groups: list[list[int]] = []
    group: list[int] = []
    tokens = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[index]
        padded = (len(group) + 1) * length
        if group and (len(group) >= max_batch or padded > MAX_PADDED_RATIO * (tokens + length)):
            groups.append(group)
            group, tokens = [], 0
        group.append(index)
        tokens += length
    if group:
        groups.append(group)
    return groups


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    """The model's tokenizer, cut at `max_tokens`, without padding (`Encoder` pads groups).

    tokenizer.json as shipped pads and truncates to a fixed 128; both are reset here.
    """
    tokenizer = open_tokenizer(path)
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()
    return tokenizer


class Encoder:
    """Texts in, unit-length float32 sentence embeddings out, `max_batch` texts per run."""

    def __init__(
        self,
        folder: Path,
        device: Device = "auto",
        intra_op_threads: int | None = None,
        max_batch: int = 32,
    ) -> None:
        model_path = folder / MODEL_FILE
        self.session = open_session(model_path, device, intra_op_threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "max_seq_length" not in metadata:
            raise ModelLoadError(f"model file {model_path} does not record its max_seq_length")
        self.max_tokens = int(metadata["max_seq_length"])
        self.tokenizer = load_tokenizer(folder / TOKENIZER_FILE, self.max_tokens)
        self.max_batch = max_batch
        self.dimension = int(self.session.get_outputs()[0].shape[1])
        # The first run allocates and plans; pay for it at start, not on the first request.
        self.embed([WARM_UP_TEXT])

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One row per text, in order; an empty list gives an empty (0, dimension) array."""
        encodings = self.tokenizer.encode_batch(texts)
        embeddings = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for group in length_groups([len(e.ids) for e in encodings], self.max_batch):
            embeddings[group] = self._run([encodings[i].ids for i in group])
        return embeddings

    def _run(self, token_ids: list[list[int]]) -> npt.NDArray[np.float32]:
        longest = max(len(ids) for ids in token_ids)
        input_ids = np.zeros((len(token_ids), longest), dtype=np.int64)
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        (embeddings,) = self.session.run([OUTPUT], feed)
        return np.asarray(embeddings, dtype=np.float32)

"""A fast smoke test of `bench.locality.measure` on a handful of prompts, no model needed."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.locality import (
    EDITS,
    SHAREGPT_PAIR_COSINE,
    EmbeddingCache,
    edited_pairs,
    measure,
    plot,
)

PROMPTS = [
    "Write a short poem about the sea and the wind.",
    "Explain how a hash table works, with an example in Python.",
    "Give me three ideas for a birthday party for a ten year old.",
    "Summarize the plot of Hamlet in two sentences.",
    "How do I make a simple web server in Go?",
    "What is the best way to learn to play the guitar as an adult?",
    "Translate 'good morning, how are you' into French.",
    "Create a list of healthy snacks that are easy to make at home.",
]


def trigram_embed(texts: list[str]) -> npt.NDArray[np.float32]:
    """Hashed character trigrams, normalised: small edits keep the cosine high."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        lowered = " ".join(text.lower().split())
        for i in range(len(lowered) - 2):
            out[row, zlib.crc32(lowered[i : i + 3].encode()) % 64] += 1.0
    normed: npt.NDArray[np.float32] = out / np.linalg.norm(out, axis=1, keepdims=True)
    return normed


def test_every_edit_changes_the_text_a_little() -> None:
    rng = random.Random(0)
    for text in PROMPTS:
        for kind, edit in EDITS.items():
            edited = edit(text, rng)
            if edited is None:
                continue
            assert edited != text, kind
            assert abs(len(edited) - len(text)) < 40, kind


def test_edited_pairs_cover_every_kind() -> None:
    kinds = {kind for _, _, kind in edited_pairs(PROMPTS, seed=1)}
    assert kinds == set(EDITS)


def test_measure_smoke(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "emb.npz", "trigram")
    report = measure(
        PROMPTS,
        trigram_embed,
        bases=4,
        partitions=(2, 4),
        bits=(1, 2, 3),
        seeds=2,
        cache=cache,
        progress=False,
    )
    json.dumps(report)
    assert report["global_index_miss"] == 0.0
    edits = report["pairs"]["edits"]
    assert edits["made"] >= 4 * 5
    # Casing and whitespace do not change this embedding (nor MiniLM's): left out.
    assert edits["count"] == edits["made"] - edits["same_embedding_left_out"] < edits["made"]
    assert set(report["results"]) == {
        "modulo",
        "modulo+center",
        "gray",
        "gray+center",
        "kafka",
        "kafka+center",
    }
    entry = report["results"]["modulo"]["4x2"]
    assert entry["partitions"] == 4 and entry["bits"] == 2
    for value in entry["miss"].values():
        assert value is None or 0.0 <= value <= 1.0
    assert entry["load_max_over_mean"] >= 1.0
    # One bit cannot fill four partitions.
    assert report["results"]["modulo"]["4x1"]["partitions_used_min"] <= 2
    assert set(report["recommendation"]["by_partitions"]) == {"2", "4"}

    # A rerun takes every embedding from the cache.
    def refuse(texts: list[str]) -> npt.NDArray[np.float32]:
        raise AssertionError(f"embedded {len(texts)} texts again")

    again = measure(
        PROMPTS,
        refuse,
        bases=4,
        partitions=(2,),
        bits=(1,),
        seeds=1,
        cache=EmbeddingCache(tmp_path / "emb.npz", "trigram"),
        progress=False,
    )
    assert again["pairs"]["edits"]["count"] == edits["count"]


def test_the_plot_draws_a_row_for_each_variant(tmp_path: Path) -> None:
    metric = f"sharegpt@{SHAREGPT_PAIR_COSINE:.2f}"

    def entry(partitions: int, bits: int) -> dict[str, object]:
        miss = {metric: 0.1 * bits, "edits@0.95": 0.05 * bits}
        return {"partitions": partitions, "bits": bits, "miss": miss, "load_max_over_mean": 1.5}

    report = {
        "results": {
            "modulo": {"a": entry(4, 2), "b": entry(4, 4), "c": entry(8, 2)},
            "kafka": {"a": entry(4, 2)},
        },
        "load_floor": {"4": 1.1, "8": 1.2},
    }
    target = tmp_path / "locality.png"
    plot(report, ["modulo", "kafka"], target)
    assert target.read_bytes().startswith(b"\x89PNG")

"""The committed pair set, and eval-pairs through the real encoder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from agents.semantic import GUARD_KINDS
from evaluation.pairs.build import OUT, build
from evaluation.pairs.evaluate import decide, embed, load_pairs, summarise
from inference.encoder import Encoder
from llmflow.cli import main
from models.embedding import ensure_embedding_model
from topology.settings import Settings

NEGATIVE_KINDS = {
    "negation",
    "swapped_entities",
    "changed_number",
    "changed_date",
    "changed_entity",
    "narrowed_scope",
    "widened_scope",
}


@pytest.fixture(scope="module")
def pairs() -> list[dict[str, object]]:
    return load_pairs(OUT)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(ensure_embedding_model(Path(Settings().embedding.path)), "cpu")


def test_committed_set_is_what_build_writes(pairs: list[dict[str, object]]) -> None:
    assert pairs == build()


def test_committed_set_has_the_kinds_and_sizes(pairs: list[dict[str, object]]) -> None:
    kinds = Counter(p["kind"] for p in pairs)
    assert kinds["paraphrase"] >= 300
    assert sum(n for kind, n in kinds.items() if kind != "paraphrase") >= 300
    assert NEGATIVE_KINDS <= set(kinds)
    for pair in pairs:
        assert pair["same_answer"] is (pair["kind"] == "paraphrase")
        assert pair["a"] != pair["b"]


def test_eval_pairs_on_a_sample(tmp_path: Path, pairs: list[dict[str, object]]) -> None:
    sample = pairs[::40]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in sample))
    out = tmp_path / "report.json"
    assert main(["eval-pairs", "--pairs", str(source), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["decisions"]) == len(sample)
    for rows in report["by_guards"].values():
        for row in rows:
            assert 0.0 <= row["precision"] <= 1.0
            assert 0.0 <= row["recall"] <= 1.0
            assert 0.0 <= row["false_hit_rate"] <= 1.0


def test_guards_and_default_threshold_on_the_committed_set(
    encoder: Encoder, pairs: list[dict[str, object]]
) -> None:
    """What the set shows: recall holds the target and the guards stop every negation,
    changed number, date and entity; antonyms and swapped lowercase terms still hit."""
    vectors = embed(encoder, [str(t) for p in pairs for t in (p["a"], p["b"])])
    threshold = Settings().semantic.threshold
    hits = [decide(p, vectors, threshold, GUARD_KINDS) for p in pairs]
    report = summarise(pairs, hits)
    assert report["recall"] >= 0.80
    for kind in ("negation", "changed_number", "changed_date", "changed_entity"):
        assert report["kinds"][kind]["hits"] == 0
    assert report["false_hit_rate"] > 0.005

"""`llmflow eval-pairs`: how often the semantic index serves b the answer stored for a.

Every pair gets a fresh SemanticIndex: the answer for `a` is stored under the context of a
request of one tenant, then `b` (same tenant, same context) is looked up. A hit on a
paraphrase is right; a hit on a hard negative is a false hit, the error that matters.
This runs at several thresholds, without guards, with each guard alone and with all.
At the configured threshold each pair also goes through the stages' own logic, as the
pipeline would run it (float16 embeddings on envelopes, fresh state per pair): the cache
stage's semantic layer with `a`'s answer stored, and dedup with `a` in flight. Those are
the decisions written per pair (`cache_hit`, `merged`).

The committed set (evaluation/pairs/pairs.jsonl) is split in two halves by a hash of each
pair, its two texts unordered (a narrowed pair and its widened reverse fall together):
guards and the threshold are tuned on `dev` only, and `test` is reported apart. A file of
one's own is evaluated whole, unless its pairs carry a "split" field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.cache import SemanticCache, semantic_query
from agents.dedup import Admission, InflightRegistry
from agents.semantic import GUARD_KINDS, SemanticIndex, Vector, context_key, guards
from inference.encoder import Encoder
from llmflow.reports import figure, write_report
from schemas.messages import ChatMessage, Envelope, LLMRequest, Role, encode_embedding
from topology.settings import DedupSettings, SemanticCacheSettings, load_settings

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(19)]
GUARD_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    **{kind: (kind,) for kind in GUARD_KINDS},
    "all": GUARD_KINDS,
}
TARGET_FALSE_HIT_RATE = 0.005
TARGET_RECALL = 0.80
SYSTEM_PROMPT = "You are a helpful assistant."
SPLITS = ("dev", "test")


def split_of(pair: dict[str, Any]) -> str:
    """`dev` or `test`, from a hash of the pair's texts, whichever comes first."""
    if "split" in pair:
        return str(pair["split"])
    key = "\n".join(sorted((str(pair["a"]), str(pair["b"]))))
    return SPLITS[hashlib.sha256(key.encode()).digest()[0] % 2]


def is_committed_set(path: Path) -> bool:
    from evaluation.pairs.build import OUT

    return path.resolve() == OUT.resolve()


def load_pairs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def embed(encoder: Encoder, texts: Sequence[str]) -> dict[str, Vector]:
    """Each distinct text embedded once, in batches: the model is the slow part."""
    unique = sorted(set(texts))
    vectors: dict[str, Vector] = {}
    step = encoder.max_batch * 4
    for start in tqdm(range(0, len(unique), step), desc="embedding", unit="batch"):
        chunk = unique[start : start + step]
        vectors.update(zip(chunk, encoder.embed(chunk), strict=True))
    return vectors


def _request(text: str, request_id: str = "eval") -> LLMRequest:
    messages = [
        ChatMessage(role=Role.SYSTEM, content=SYSTEM_PROMPT),
        ChatMessage(role=Role.USER, content=text),
    ]
    return LLMRequest(id=request_id, tenant="eval", model="sim-small", messages=messages)


def _envelope(text: str, vectors: dict[str, Vector], request_id: str) -> Envelope:
    return Envelope(
        request=_request(text, request_id),
        fingerprint=request_id,
        embedding=encode_embedding(vectors[text]),
    )


def through_the_stages(
    pair: dict[str, Any], vectors: dict[str, Vector], settings: SemanticCacheSettings
) -> dict[str, bool]:
    """Whether the cache stage serves b the answer stored for a, and whether dedup makes b
    follow a in flight: each with fresh state, one tenant, one context."""
    first, second = _envelope(pair["a"], vectors, "a"), _envelope(pair["b"], vectors, "b")
    stored, asked = semantic_query(first, settings), semantic_query(second, settings)
    assert stored is not None and asked is not None and first.embedding is not None
    cache = SemanticCache(settings, {})
    cache.store(stored, "a", first.embedding, expires_at=60.0, now=0.0, partition=0)
    registry = InflightRegistry({}, DedupSettings(), settings)
    registry.admit(first, now=0.0)
    return {
        "cache_hit": cache.match(asked, now=1.0, partition=0) is not None,
        "merged": registry.admit(second, now=1.0) is Admission.FOLLOW,
    }


def decide(
    pair: dict[str, Any],
    vectors: dict[str, Vector],
    threshold: float,
    guard_kinds: tuple[str, ...],
) -> bool:
    """Whether looking up b, in a fresh index holding a's answer, hits."""
    index: SemanticIndex[str] = SemanticIndex(SemanticCacheSettings(), guard_kinds)
    a, b = pair["a"], pair["b"]
    index.add(context_key(_request(a), ()), vectors[a], a, "answer for a", now=0.0)
    match = index.lookup(context_key(_request(b), ()), vectors[b], b, 1.0, threshold)
    return match is not None


def summarise(pairs: list[dict[str, Any]], hits: list[bool]) -> dict[str, Any]:
    """Recall on paraphrases, false-hit rate on hard negatives, precision: overall and per
    kind (a negative kind's precision counts the paraphrase hits against its false hits)."""
    true_hits = sum(h for p, h in zip(pairs, hits, strict=True) if p["same_answer"])
    positives = sum(1 for p in pairs if p["same_answer"])
    kinds: dict[str, dict[str, Any]] = {}
    for pair, hit in zip(pairs, hits, strict=True):
        numbers = kinds.setdefault(pair["kind"], {"pairs": 0, "hits": 0})
        numbers["pairs"] += 1
        numbers["hits"] += hit
    for kind, numbers in kinds.items():
        rate = numbers["hits"] / numbers["pairs"]
        if kind == "paraphrase":
            numbers["recall"] = round(rate, 4)
        else:
            numbers["false_hit_rate"] = round(rate, 4)
            served = true_hits + numbers["hits"]
            numbers["precision"] = round(true_hits / served, 4) if served else 1.0
    negatives = len(pairs) - positives
    false_hits = sum(hits) - true_hits
    return {
        "precision": round(true_hits / sum(hits), 4) if sum(hits) else 1.0,
        "recall": round(true_hits / positives, 4) if positives else 0.0,
        "false_hit_rate": round(false_hits / negatives, 4) if negatives else 0.0,
        "false_hits": false_hits,
        "kinds": kinds,
    }


def evaluate_splits(
    pairs: list[dict[str, Any]],
    vectors: dict[str, Vector],
    thresholds: Sequence[float],
    split: bool,
) -> dict[str, Any]:
    """`evaluate` on all pairs and, when `split`, on each half; the recommended threshold
    then comes from dev alone."""
    report = evaluate(pairs, vectors, thresholds)
    if not split:
        return report
    report["splits"] = {
        name: evaluate([p for p in pairs if split_of(p) == name], vectors, thresholds)
        for name in SPLITS
    }
    report["recommended_threshold"] = report["splits"]["dev"]["recommended_threshold"]
    report["recommended_from"] = "dev"
    return report


def evaluate(
    pairs: list[dict[str, Any]], vectors: dict[str, Vector], thresholds: Sequence[float]
) -> dict[str, Any]:
    """Numbers per guard set and threshold, and the threshold that meets the target."""
    grid: dict[str, list[dict[str, Any]]] = {}
    runs = [(name, t) for name in GUARD_SETS for t in thresholds]
    for name, threshold in tqdm(runs, desc="evaluating", unit="run", leave=False):
        hits = [decide(pair, vectors, threshold, GUARD_SETS[name]) for pair in pairs]
        grid.setdefault(name, []).append({"threshold": threshold, **summarise(pairs, hits)})
    meeting = [r for r in grid["all"] if r["false_hit_rate"] <= TARGET_FALSE_HIT_RATE]
    return {
        "pairs": len(pairs),
        "targets": {"false_hit_rate": TARGET_FALSE_HIT_RATE, "recall": TARGET_RECALL},
        "recommended_threshold": meeting[0]["threshold"] if meeting else None,
        "by_guards": grid,
    }


def decisions(
    pairs: list[dict[str, Any]], vectors: dict[str, Vector], settings: SemanticCacheSettings
) -> list[dict[str, Any]]:
    """Per pair: similarity, guard terms, the index's decision with and without guards, and
    what the cache and dedup stages decide."""
    threshold = settings.threshold
    rows = []
    for pair in pairs:
        a, b = pair["a"], pair["b"]
        rows.append(
            {
                **pair,
                "similarity": round(float(np.dot(vectors[a], vectors[b])), 4),
                "guards_a": list(guards(a)),
                "guards_b": list(guards(b)),
                "hit_without_guards": decide(pair, vectors, threshold, ()),
                "hit_with_guards": decide(pair, vectors, threshold, GUARD_KINDS),
                **through_the_stages(pair, vectors, settings),
                "split": split_of(pair),
            }
        )
    return rows


def stage_summaries(rows: list[dict[str, Any]], split: bool) -> dict[str, Any]:
    """Recall, precision and false-hit rate of the stages' decisions, per split if split."""
    parts = {"all": rows}
    if split:
        parts |= {name: [r for r in rows if r["split"] == name] for name in SPLITS}
    return {
        name: {
            stage: {
                k: v for k, v in summarise(part, [r[stage] for r in part]).items() if k != "kinds"
            }
            for stage in ("cache_hit", "merged")
        }
        for name, part in parts.items()
    }


def at(report: dict[str, Any], guard_set: str, threshold: float) -> dict[str, Any]:
    return next(r for r in report["by_guards"][guard_set] if r["threshold"] == threshold)


def table(report: dict[str, Any], threshold: float) -> str:
    """Per split (when split), then on all pairs: the sweep, per kind and per guard."""
    parts = [
        f"== {name} ({part['pairs']} pairs)\n{_table(part, threshold)}"
        for name, part in report.get("splits", {}).items()
    ]
    parts.append(f"== all ({report['pairs']} pairs)\n{_table(report, threshold)}")
    if "splits" in report:
        parts.append(f"recommended threshold (from dev): {report['recommended_threshold']}")
    return "\n\n".join(parts)


def _table(report: dict[str, Any], threshold: float) -> str:
    """Threshold sweep without and with guards, then per kind and per guard at `threshold`."""
    lines = ["threshold | no guards: recall  FHR     prec  | all guards: recall  FHR     prec"]
    for plain, guarded in zip(report["by_guards"]["none"], report["by_guards"]["all"], strict=True):
        lines.append(
            f"{plain['threshold']:9.2f} | {plain['recall']:17.3f} {plain['false_hit_rate']:7.4f} "
            f"{plain['precision']:6.3f} | {guarded['recall']:18.3f} "
            f"{guarded['false_hit_rate']:7.4f} {guarded['precision']:6.3f}"
        )
    plain, guarded = at(report, "none", threshold), at(report, "all", threshold)
    lines += ["", f"at threshold {threshold}: kind (pairs) | hit rate without | with guards"]
    for kind, numbers in sorted(plain["kinds"].items()):
        with_guards = guarded["kinds"][kind]
        lines.append(
            f"  {kind:18} ({numbers['pairs']:3}) | {numbers['hits'] / numbers['pairs']:7.3f} "
            f"| {with_guards['hits'] / with_guards['pairs']:7.3f}"
        )
    lines += ["", f"at threshold {threshold}: guard | recall | hard-negative false-hit rate"]
    for name in GUARD_SETS:
        row = at(report, name, threshold)
        lines.append(f"  {name:9} | {row['recall']:.3f} | {row['false_hit_rate']:.4f}")
    lines.append(
        f"recommended threshold (all guards, FHR <= 0.5%): {report['recommended_threshold']}"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Precision and recall, and the hard-negative false-hit rate, against the threshold."""
    parts = report.get("splits", {"all": report})
    size = (12, 4.5 * len(parts))
    with figure(path, len(parts), 2, dpi=120, figsize=size, squeeze=False) as axes:
        for (name, part), (left, right) in zip(parts.items(), axes, strict=True):
            _plot_part(part, name, left, right)


def _plot_part(report: dict[str, Any], split: str, left: Any, right: Any) -> None:
    for name, style in (("none", "--"), ("all", "-")):
        rows = report["by_guards"][name]
        xs = [r["threshold"] for r in rows]
        left.plot(xs, [r["precision"] for r in rows], style, label=f"precision ({name} guards)")
        left.plot(xs, [r["recall"] for r in rows], style, label=f"recall ({name} guards)")
    left.axhline(TARGET_RECALL, color="grey", linewidth=0.8)
    left.set(xlabel="cosine threshold", ylabel="share", title=f"paraphrases ({split})")
    left.legend(fontsize=8)
    for name, rows in report["by_guards"].items():
        xs = [r["threshold"] for r in rows]
        right.plot(xs, [r["false_hit_rate"] for r in rows], label=f"{name} guards")
    right.axhline(TARGET_FALSE_HIT_RATE, color="grey", linewidth=0.8, label="0.5 % target")
    right.set(xlabel="cosine threshold", ylabel="false-hit rate", title=f"hard negatives ({split})")
    right.set_yscale("symlog", linthresh=0.01)
    right.legend(fontsize=6)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    path = Path(args.pairs)
    pairs = load_pairs(path)
    encoder = Encoder(Path(settings.embedding.path), settings.engine.device)
    vectors = embed(encoder, [text for p in pairs for text in (p["a"], p["b"])])
    threshold = settings.semantic.threshold
    split = is_committed_set(path) or any("split" in p for p in pairs)
    report = evaluate_splits(pairs, vectors, sorted({*THRESHOLDS, threshold}), split)
    report["default_threshold"] = threshold
    report["decisions"] = decisions(pairs, vectors, settings.semantic)
    report["stages"] = stage_summaries(report["decisions"], split)
    print(table(report, threshold))
    print(f"\nthrough the cache and dedup stages at {threshold}:")
    for name, stages in report["stages"].items():
        for stage, numbers in stages.items():
            print(
                f"  {name:4} {stage:9} recall {numbers['recall']:.3f}  precision "
                f"{numbers['precision']:.3f}  false-hit rate {numbers['false_hit_rate']:.4f} "
                f"({numbers['false_hits']} false hits)"
            )
    write_report(report, args.json, args.plot, lambda path: plot(report, path))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="labelled pairs, one JSON object a line")
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--plot", help="where to write a PNG of the threshold sweep")

"""`llmflow bench locality`: how many near-duplicates does LSH partitioning keep apart?

Dedup/merge and the semantic cache look a request up only among what its own partition
holds. One global index would find every pair of near-duplicates at cosine ≥ the matching
threshold; a partitioned one misses each pair whose two prompts land on different
partitions. For `streams.locality.SemanticBucketer` (random hyperplanes, every mapping,
hyperplanes through the origin or through the mean prompt embedding) at 4, 8, 16 and 32
partitions and 1..8 bits, this measures, averaged over several seeds:
- `miss`: the share of near-duplicate pairs at cosine ≥ each threshold that land on
  different partitions (a global index misses 0), for two kinds of pairs:
  `edits`, real ShareGPT prompts next to a copy with one small edit (casing, whitespace,
  punctuation, a synonym, a typo, a polite prefix) that changes the embedding at all
  (casing and whitespace do not: the tokenizer is uncased), and `sharegpt`, pairs of distinct
  ShareGPT prompts whose embeddings are at cosine ≥ 0.9;
- `load`: max/mean partition load over ShareGPT prompts (1.0 is perfect), next to
  `load_floor`, the same statistic for a uniform random assignment of those prompts
  (what keying by a per-request fingerprint gives), which is the sampling-noise floor.
It recommends, per partition count, the setting with the fewest misses (edits plus
ShareGPT pairs at 0.90) whose mean max/mean load stays within `--max-skew`, among
settings with at most log2(partitions) bits (more bits than that change nothing for
`modulo` and `gray` but noise, and only add misses for `kafka`); settings within two
points of the fewest are ties, won by fewer bits, then by lower load.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from llmflow.reports import figure, write_report
from streams.locality import MAPPINGS, Mapping, SemanticBucketer

Embed = Callable[[list[str]], npt.NDArray[np.float32]]
Vectors = npt.NDArray[np.float32]

PARTITIONS = (4, 8, 16, 32)
BITS = tuple(range(1, 9))
THRESHOLDS = (0.90, 0.95)
SHAREGPT_PAIR_COSINE = 0.90
# Edits the embedding does not see (the tokenizer is uncased and splits on whitespace) give
# identical vectors, which always share a bucket; they are counted but left out of `edits`.
SAME_EMBEDDING = 0.9999
# Settings whose miss rate is within this of the best are ties: between seeds and between
# statistically identical settings the measured rates differ by a point or two.
MISS_TOLERANCE = 0.02
DEFAULT_CACHE = ".cache/bench/locality-embeddings.npz"
EMBED_CHUNK = 256

SYNONYMS = {
    "write": "compose",
    "explain": "describe",
    "make": "create",
    "create": "generate",
    "help": "assist",
    "show": "display",
    "give": "provide",
    "use": "utilize",
    "big": "large",
    "small": "little",
    "fast": "quick",
    "good": "great",
    "list": "enumerate",
    "need": "require",
    "find": "locate",
    "want": "would like",
    "example": "sample",
    "simple": "basic",
    "article": "post",
    "improve": "enhance",
    "summarize": "sum up",
    "answer": "reply",
    "question": "query",
    "text": "passage",
    "code": "program",
    "ideas": "suggestions",
    "best": "top",
    "how": "in what way",
    "tell": "inform",
    "about": "regarding",
}
POLITE_PREFIXES = (
    "Please ",
    "Hi! Could you help me with this? ",
    "Hey, quick question: ",
    "Thanks in advance. ",
)
WORD = re.compile(r"[A-Za-z]{4,}")


def _casing(text: str, _rng: random.Random) -> str | None:
    if text.lower() != text:
        return text.lower()
    upper = text[:1].upper() + text[1:]
    return upper if upper != text else None


def _whitespace(text: str, rng: random.Random) -> str | None:
    spaces = [i for i, c in enumerate(text) if c == " "]
    chosen = set(rng.sample(spaces, min(2, len(spaces))))
    return "".join("  " if i in chosen else c for i, c in enumerate(text)) + "\n"


def _punctuation(text: str, _rng: random.Random) -> str | None:
    stripped = text.rstrip()
    edited = stripped[:-1] if stripped[-1:] in ".?!" else stripped + "?"
    return edited.replace(",", "")


def _synonym(text: str, rng: random.Random) -> str | None:
    found = [m for m in re.finditer(r"[A-Za-z]+", text) if m.group().lower() in SYNONYMS]
    if not found:
        return None
    match = rng.choice(found)
    word = SYNONYMS[match.group().lower()]
    if match.group()[0].isupper():
        word = word[0].upper() + word[1:]
    return text[: match.start()] + word + text[match.end() :]


def _typo(text: str, rng: random.Random) -> str | None:
    words = list(WORD.finditer(text))
    if not words:
        return None
    match = rng.choice(words)
    at = match.start() + rng.randrange(1, len(match.group()) - 2)
    return text[:at] + text[at + 1] + text[at] + text[at + 2 :]


def _polite(text: str, rng: random.Random) -> str | None:
    prefix = rng.choice(POLITE_PREFIXES)
    body = text[:1].lower() + text[1:] if prefix == "Please " else text
    return prefix + body


EDITS: dict[str, Callable[[str, random.Random], str | None]] = {
    "casing": _casing,
    "whitespace": _whitespace,
    "punctuation": _punctuation,
    "synonym": _synonym,
    "typo": _typo,
    "polite_prefix": _polite,
}


def edited_pairs(bases: Sequence[str], seed: int) -> list[tuple[int, str, str]]:
    """(index of the base, edited text, kind of edit) for each base and applicable edit."""
    rng = random.Random(seed)
    pairs = []
    for index, text in enumerate(bases):
        for kind, edit in EDITS.items():
            edited = edit(text, rng)
            if edited is not None and edited != text:
                pairs.append((index, edited, kind))
    return pairs


class EmbeddingCache:
    """Embeddings by text digest in one .npz file, so reruns embed only new texts."""

    def __init__(self, path: Path | None, model_id: str) -> None:
        self.path = path
        self.model_id = model_id
        self.vectors: dict[str, Vectors] = {}
        if path is not None and path.is_file():
            with np.load(path) as stored:
                keys = [str(k) for k in stored["keys"]]
                self.vectors = dict(zip(keys, stored["vectors"], strict=True))

    def digest(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()

    def embed(self, texts: list[str], embed: Embed) -> Vectors:
        missing = list(dict.fromkeys(t for t in texts if self.digest(t) not in self.vectors))
        if missing:
            chunks = range(0, len(missing), EMBED_CHUNK)
            for start in tqdm(chunks, desc="embedding", unit="chunk"):
                chunk = missing[start : start + EMBED_CHUNK]
                for text, vector in zip(chunk, embed(chunk), strict=True):
                    self.vectors[self.digest(text)] = vector
            self.save()
        return np.stack([self.vectors[self.digest(t)] for t in texts]).astype(np.float32)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self.vectors))
        np.savez(self.path, keys=keys, vectors=np.stack(list(self.vectors.values())))


@dataclass
class PairSet:
    """Pairs of rows of the vectors matrix and the cosine of each."""

    name: str
    left: npt.NDArray[np.int64]
    right: npt.NDArray[np.int64]
    cosine: npt.NDArray[np.float32]
    kinds: list[str] = field(default_factory=list)


def similar_pairs(vectors: Vectors, threshold: float, block: int = 1024) -> PairSet:
    """All pairs i < j of unit rows at cosine ≥ threshold (the global index's matches)."""
    left, right, cosine = [], [], []
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T
        rows, cols = np.nonzero(sims >= threshold)
        rows_abs = rows + start
        keep = cols > rows_abs
        left.append(rows_abs[keep])
        right.append(cols[keep])
        cosine.append(sims[rows[keep], cols[keep]])
    return PairSet(
        "sharegpt",
        np.concatenate(left).astype(np.int64) if left else np.zeros(0, np.int64),
        np.concatenate(right).astype(np.int64) if right else np.zeros(0, np.int64),
        np.concatenate(cosine).astype(np.float32) if cosine else np.zeros(0, np.float32),
    )


def max_over_mean(parts: npt.NDArray[np.int64], partitions: int) -> float:
    loads = np.bincount(parts, minlength=partitions)
    return float(loads.max() / loads.mean())


def miss_rate(parts: npt.NDArray[np.int64], pairs: PairSet, threshold: float) -> float | None:
    chosen = pairs.cosine >= threshold
    if not chosen.any():
        return None
    return float(np.mean(parts[pairs.left[chosen]] != parts[pairs.right[chosen]]))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def variant_name(mapping: Mapping, centered: bool) -> str:
    return f"{mapping}+center" if centered else mapping


def evaluate(
    vectors: Vectors,
    pair_sets: list[PairSet],
    load_rows: npt.NDArray[np.int64],
    center: npt.NDArray[np.float64],
    partitions: Sequence[int],
    bits: Sequence[int],
    thresholds: Sequence[float],
    seeds: int,
    progress: bool,
) -> dict[str, dict[str, dict[str, Any]]]:
    """results[variant][f"{partitions}x{bits}"] = misses and load, averaged over seeds."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    combos = [(m, c, b) for m in MAPPINGS for c in (False, True) for b in bits]
    for mapping, centered, nbits in tqdm(combos, desc="evaluating", disable=not progress):
        variant = results.setdefault(variant_name(mapping, centered), {})
        samples: dict[int, list[dict[str, Any]]] = {p: [] for p in partitions}
        for seed in range(seeds):
            bucketer = SemanticBucketer(
                vectors.shape[1],
                nbits,
                seed,
                mapping=mapping,
                center=center if centered else None,
            )
            buckets = bucketer.buckets(vectors)
            for count in partitions:
                parts = bucketer.partitions_of(buckets, count)
                sample: dict[str, Any] = {"load": max_over_mean(parts[load_rows], count)}
                sample["used"] = len(np.unique(parts[load_rows]))
                for pairs in pair_sets:
                    for t in thresholds:
                        sample[f"{pairs.name}@{t:.2f}"] = miss_rate(parts, pairs, t)
                samples[count].append(sample)
        for count, runs in samples.items():
            entry: dict[str, Any] = {"partitions": count, "bits": nbits}
            entry["miss"] = {key: _mean([r[key] for r in runs]) for key in runs[0] if "@" in key}
            loads = [r["load"] for r in runs]
            entry["load_max_over_mean"] = round(float(np.mean(loads)), 3)
            entry["load_max_over_mean_worst_seed"] = round(float(np.max(loads)), 3)
            entry["partitions_used_min"] = min(r["used"] for r in runs)
            variant[f"{count}x{nbits}"] = entry
    return results


def load_floor(rows: int, partitions: int, seeds: int) -> float:
    """Mean max/mean load when each of `rows` items picks a partition uniformly at random."""
    rng = np.random.default_rng(12345)
    values = [max_over_mean(rng.integers(0, partitions, rows), partitions) for _ in range(seeds)]
    return round(float(np.mean(values)), 3)


def recommend(
    results: dict[str, dict[str, dict[str, Any]]],
    partitions: Sequence[int],
    metrics: Sequence[str],
    max_skew: float,
) -> dict[str, Any]:
    """Per partition count: fewest misses (mean over `metrics`) with max/mean load ≤ max_skew.

    Only settings with at most log2(partitions) bits compete. Misses within MISS_TOLERANCE
    of the fewest tie; ties go to fewer bits, then lower load.
    """
    chosen: dict[str, Any] = {}
    for count in partitions:
        candidates: list[tuple[float, int, float, str]] = []
        for variant, entries in results.items():
            for entry in entries.values():
                misses = [entry["miss"].get(m) for m in metrics]
                if entry["partitions"] != count or any(m is None for m in misses):
                    continue
                if entry["bits"] > max(1, (count - 1).bit_length()):
                    continue
                if entry["load_max_over_mean"] > max_skew:
                    continue
                miss = float(np.mean([m for m in misses if m is not None]))
                candidates.append((miss, entry["bits"], entry["load_max_over_mean"], variant))
        if not candidates:
            chosen[str(count)] = None
            continue
        fewest = min(c[0] for c in candidates)
        tied = [c for c in candidates if c[0] <= fewest + MISS_TOLERANCE]
        _, bits, _, variant = min(tied, key=lambda c: (c[1], c[2]))
        chosen[str(count)] = {"variant": variant, **results[variant][f"{count}x{bits}"]}
    return chosen


def measure(
    prompts: list[str],
    embed: Embed,
    *,
    bases: int,
    partitions: Sequence[int] = PARTITIONS,
    bits: Sequence[int] = BITS,
    thresholds: Sequence[float] = THRESHOLDS,
    seeds: int = 8,
    max_skew: float = 1.5,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole measurement on `prompts` (distinct texts); returns the JSON report."""
    rng = random.Random(0)
    base_rows = sorted(rng.sample(range(len(prompts)), min(bases, len(prompts))))
    edits = edited_pairs([prompts[i] for i in base_rows], seed=1)
    texts = prompts + [text for _, text, _ in edits]
    cache = cache or EmbeddingCache(None, "")
    vectors = cache.embed(texts, embed)
    share = similar_pairs(vectors[: len(prompts)], min(SHAREGPT_PAIR_COSINE, *thresholds))
    left = np.array([base_rows[i] for i, _, _ in edits], dtype=np.int64)
    right = np.arange(len(prompts), len(texts), dtype=np.int64)
    all_cosines = np.einsum("ij,ij->i", vectors[left], vectors[right]).astype(np.float32)
    changed = all_cosines < SAME_EMBEDDING
    edit_set = PairSet(
        "edits",
        left[changed],
        right[changed],
        all_cosines[changed],
        [kind for (_, _, kind), keep in zip(edits, changed, strict=True) if keep],
    )
    # The center is fitted on the first quarter of the prompts; load is measured on the rest.
    fit = max(1, len(prompts) // 4)
    center = vectors[:fit].astype(np.float64).mean(axis=0)
    load_rows = np.arange(fit, len(prompts), dtype=np.int64)
    results = evaluate(
        vectors,
        [edit_set, share],
        load_rows,
        center,
        partitions,
        bits,
        thresholds,
        seeds,
        progress,
    )
    metrics = [f"edits@{SHAREGPT_PAIR_COSINE:.2f}", f"sharegpt@{SHAREGPT_PAIR_COSINE:.2f}"]
    all_kinds = [kind for _, _, kind in edits]
    edit_cos = {
        kind: [float(c) for c, k in zip(all_cosines, all_kinds, strict=True) if k == kind]
        for kind in sorted(set(all_kinds))
    }
    return {
        "prompts": len(prompts),
        "seeds": seeds,
        "center_fitted_on_prompts": fit,
        "load_measured_on_prompts": len(load_rows),
        "mean_embedding_norm": round(float(np.linalg.norm(center)), 4),
        "pairs": {
            "edits": {
                "bases": len(base_rows),
                "made": len(edits),
                "same_embedding_left_out": int(np.sum(~changed)),
                "count": len(edit_set.cosine),
                "by_kind": {
                    kind: {
                        "count": len(values),
                        "cosine_median": round(float(np.median(values)), 4),
                        "same_embedding": round(
                            float(np.mean(np.array(values) >= SAME_EMBEDDING)), 4
                        ),
                        **{
                            f"share_at_or_above_{t:.2f}": round(
                                float(np.mean(np.array(values) >= t)), 4
                            )
                            for t in thresholds
                        },
                    }
                    for kind, values in edit_cos.items()
                },
                **{f"at_or_above_{t:.2f}": int(np.sum(edit_set.cosine >= t)) for t in thresholds},
            },
            "sharegpt": {
                "min_cosine": SHAREGPT_PAIR_COSINE,
                "prompts_in_pairs": len(np.union1d(share.left, share.right)),
                **{f"at_or_above_{t:.2f}": int(np.sum(share.cosine >= t)) for t in thresholds},
            },
        },
        "global_index_miss": 0.0,
        "load_floor": {str(p): load_floor(len(load_rows), p, max(seeds, 8)) for p in partitions},
        "results": results,
        "recommendation": {
            "rule": (
                f"per partition count, the fewest misses (mean of {' and '.join(metrics)}) among "
                f"settings with at most log2(partitions) bits whose mean max/mean load is at most "
                f"{max_skew}; misses within {MISS_TOLERANCE} of the fewest tie, and ties go to "
                "fewer bits, then lower load"
            ),
            "by_partitions": recommend(results, partitions, metrics, max_skew),
        },
    }


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def table(report: dict[str, Any], variant: str, thresholds: Sequence[float]) -> str:
    keys = [f"{s}@{t:.2f}" for s in ("edits", "sharegpt") for t in thresholds]
    lines = [
        f"{variant}: miss rate vs a global index (0%), and max/mean load",
        "parts bits " + " ".join(f"{k:>13}" for k in keys) + "   load  worst  floor",
    ]
    floors = report["load_floor"]
    for entry in report["results"][variant].values():
        misses = " ".join(f"{_fmt(entry['miss'][k]):>13}" for k in keys)
        lines.append(
            f"{entry['partitions']:5d} {entry['bits']:4d} {misses} "
            f"{entry['load_max_over_mean']:6.2f} {entry['load_max_over_mean_worst_seed']:6.2f}"
            f" {floors[str(entry['partitions'])]:6.2f}"
        )
    return "\n".join(lines)


def compare(report: dict[str, Any], thresholds: Sequence[float]) -> str:
    """Every variant at bits = log2(partitions) (rounded up), and kafka at 8 bits."""
    keys = [f"{s}@{t:.2f}" for s in ("edits", "sharegpt") for t in thresholds]
    lines = [
        "every variant at bits = log2(partitions); kafka also at 8 bits",
        "variant        parts bits " + " ".join(f"{k:>13}" for k in keys) + "   load  worst",
    ]
    for variant, entries in report["results"].items():
        for entry in entries.values():
            wanted = max(1, (entry["partitions"] - 1).bit_length())
            if entry["bits"] != wanted and not (variant == "kafka" and entry["bits"] == 8):
                continue
            misses = " ".join(f"{_fmt(entry['miss'][k]):>13}" for k in keys)
            lines.append(
                f"{variant:14s} {entry['partitions']:5d} {entry['bits']:4d} {misses} "
                f"{entry['load_max_over_mean']:6.2f} {entry['load_max_over_mean_worst_seed']:6.2f}"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], variants: Sequence[str], path: Path) -> None:
    size = (11, 3.6 * len(variants))
    with figure(path, len(variants), 2, figsize=size, squeeze=False) as axes:
        for variant, (left, right) in zip(variants, axes, strict=True):
            _plot_variant(report["results"][variant], report["load_floor"], variant, left, right)


def _plot_variant(
    results: dict[str, Any], load_floor: dict[str, float], variant: str, left: Any, right: Any
) -> None:
    """One variant's row: miss rates (left) and partition load (right) against bits."""
    metric = f"sharegpt@{SHAREGPT_PAIR_COSINE:.2f}"
    edits = "edits@0.95"
    entries = list(results.values())
    for count in sorted({e["partitions"] for e in entries}):
        mine = [e for e in entries if e["partitions"] == count]
        xs = [e["bits"] for e in mine]
        (line,) = left.plot(
            xs, [e["miss"][metric] for e in mine], "o-", label=f"{count} partitions"
        )
        left.plot(xs, [e["miss"].get(edits) for e in mine], "x--", color=line.get_color())
        right.plot(xs, [e["load_max_over_mean"] for e in mine], "o-", label=f"{count} partitions")
        right.axhline(load_floor[str(count)], color=line.get_color(), lw=0.6, ls=":")
    left.set_title(f"{variant}: near-duplicates split (o {metric}, x {edits})")
    left.set_xlabel("bits")
    left.set_ylabel("miss rate vs global index")
    left.legend(fontsize=8)
    right.set_title(f"{variant}: max/mean partition load (dotted: random)")
    right.set_xlabel("bits")
    right.set_yscale("log")
    right.legend(fontsize=8)


def run(args: argparse.Namespace) -> int:
    from inference.encoder import Encoder
    from llmflow.prompts import load_prompts
    from topology.settings import load_settings

    settings = load_settings(args.config)
    folder = Path(settings.embedding.path)
    prompts = load_prompts(args.prompts, max_chars=args.max_chars)
    model_file = folder / "model.onnx"
    model_id = f"{folder.name}:{model_file.stat().st_size if model_file.is_file() else 0}"
    cache = EmbeddingCache(Path(args.cache), model_id)
    encoder: Encoder | None = None

    def embed(texts: list[str]) -> Vectors:
        nonlocal encoder
        if encoder is None:
            encoder = Encoder(folder, "cpu", args.threads, 64)
        return encoder.embed(texts)

    report = measure(
        prompts, embed, bases=args.bases, seeds=args.seeds, max_skew=args.max_skew, cache=cache
    )
    pairs = report["pairs"]
    print(
        f"{report['prompts']} ShareGPT prompts; {pairs['edits']['count']} edited pairs with "
        f"a changed embedding (of {pairs['edits']['made']}) "
        f"({pairs['edits']['at_or_above_0.90']} at cosine ≥ 0.90, "
        f"{pairs['edits']['at_or_above_0.95']} ≥ 0.95); {pairs['sharegpt']['at_or_above_0.90']}"
        f" ShareGPT pairs ≥ 0.90 ({pairs['sharegpt']['at_or_above_0.95']} ≥ 0.95)"
    )
    for kind, stats in pairs["edits"]["by_kind"].items():
        print(
            f"  edit {kind:13s} median cosine {stats['cosine_median']:.3f}, "
            f"{100 * stats['same_embedding']:.0f}% same embedding, "
            f"{100 * stats['share_at_or_above_0.90']:.0f}% at ≥ 0.90"
        )
    chosen = report["recommendation"]["by_partitions"]
    variants = list(dict.fromkeys(c["variant"] for c in chosen.values() if c is not None))
    for variant in variants or ["modulo"]:
        print(table(report, variant, THRESHOLDS))
    print(compare(report, THRESHOLDS))
    print(f"recommendation ({report['recommendation']['rule']}):")
    for count, choice in chosen.items():
        if choice is None:
            print(f"  {count} partitions: nothing within the load bound")
            continue
        print(
            f"  {count} partitions: {choice['variant']}, {choice['bits']} bits; miss "
            + ", ".join(f"{k} {_fmt(v).strip()}" for k, v in choice["miss"].items())
            + f"; load max/mean {choice['load_max_over_mean']}"
        )
    write_report(
        report,
        args.json,
        args.plot,
        lambda path: plot(report, ["modulo", "modulo+center", "kafka"], path),
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--plot", help="where to write a PNG of miss rate and load vs bits")
    parser.add_argument("--prompts", type=int, default=20000, help="ShareGPT prompts to load")
    parser.add_argument("--max-chars", type=int, default=2000)
    parser.add_argument("--bases", type=int, default=400, help="prompts to make edited copies of")
    parser.add_argument("--seeds", type=int, default=8, help="hyperplane seeds to average over")
    parser.add_argument("--max-skew", type=float, default=1.5, help="max/mean load bound")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="embedding cache (.npz)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")

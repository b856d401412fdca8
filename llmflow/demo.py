"""The demo workload: real prompts with concurrent duplicates and later repeats.

Wave one sends distinct prompts and bursts of identical ones at once (merging answers
them); wave two repeats earlier prompts after they were answered (the cache answers them).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from llmflow.client import LLMFlowClient, new_request
from llmflow.prompts import load_prompts
from schemas.messages import LLMRequest, LLMResponse, Status

TENANTS = ("acme", "globex", "initech")


@dataclass
class Workload:
    first_wave: list[LLMRequest]
    second_wave: list[LLMRequest]


def build_workload(
    count: int,
    prompts: list[str],
    seed: int = 7,
    duplicate_share: float = 0.2,
    repeat_share: float = 0.2,
) -> Workload:
    """`count` requests: distinct ones, bursts of 2-4 identical ones, and repeats."""
    rng = random.Random(seed)
    repeats = int(count * repeat_share)
    duplicates = int(count * duplicate_share)
    first: list[LLMRequest] = []
    originals: list[tuple[str, str]] = []
    pool = iter(prompts)
    while len(first) < count - repeats:
        prompt, tenant = next(pool), rng.choice(TENANTS)
        copies = 1
        if duplicates > 0:
            copies = min(rng.randint(2, 4), duplicates + 1, count - repeats - len(first))
            duplicates -= copies - 1
        first.extend(new_request(prompt, tenant) for _ in range(copies))
        originals.append((prompt, tenant))
    # Distinct repeats: two identical ones sent together would merge rather than hit the cache.
    picks = rng.sample(originals, min(repeats, len(originals)))
    second = [new_request(*picks[i % len(picks)]) for i in range(repeats)]
    return Workload(first, second)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_rows(rows: list[tuple[str, str]]) -> str:
    """Names and numbers in two aligned columns, as the demo and eval-replay print them."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


@dataclass
class Summary:
    responses: list[LLMResponse] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    missing: int = 0
    duplicates: int = 0
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def stage_p50s(self) -> list[tuple[str, float]]:
        """Median time per stage, queue included, over requests that passed through it."""
        by_stage: dict[str, list[float]] = {}
        for response in self.responses:
            for stage, ms in response.stage_latency_ms.items():
                by_stage.setdefault(stage, []).append(ms)
        return [(stage, percentile(values, 0.5)) for stage, values in by_stage.items()]

    def table(self) -> str:
        by_status = Counter(r.status.value for r in self.responses)
        errors = Counter(r.error.code.value for r in self.responses if r.error)
        cost = sum(r.cost_usd for r in self.responses)
        cached = [r for r in self.responses if r.status is Status.CACHED]
        cache_kinds = Counter(r.cache_kind for r in cached)
        rows = [
            ("requests", str(len(self.responses) + self.missing)),
            ("answered", str(len(self.responses))),
            *((f"status {s}", str(by_status.get(s, 0))) for s in (x.value for x in Status)),
            *((f"error {code}", str(n)) for code, n in sorted(errors.items())),
            ("cache hits", str(by_status.get(Status.CACHED.value, 0))),
            *((f"  {kind}", str(cache_kinds[kind])) for kind in ("exact", "semantic")),
            ("merges", str(by_status.get(Status.MERGED.value, 0))),
            ("model calls", str(by_status.get(Status.OK.value, 0))),
            ("missing (no answer)", str(self.missing)),
            ("duplicate answers", str(self.duplicates)),
            ("latency p50 ms", f"{self.percentile(0.50):.1f}"),
            ("latency p99 ms", f"{self.percentile(0.99):.1f}"),
            *((f"  {stage} p50 ms", f"{ms:.1f}") for stage, ms in self.stage_p50s()),
            ("upstream cost usd", f"{cost:.6f}"),
            ("wall time s", f"{self.wall_s:.2f}"),
        ]
        return format_rows(rows)


async def _send_wave(
    client: LLMFlowClient, wave: list[LLMRequest], timeout: float, summary: Summary
) -> None:
    """Send all of `wave` at once; latency is from send to the answer reaching the client."""
    sent_at: dict[str, float] = {}
    answered_at: dict[str, float] = {}

    def note_answer(future: asyncio.Future[LLMResponse]) -> None:
        if not future.cancelled() and future.exception() is None:
            answered_at[future.result().id] = time.perf_counter()

    futures = []
    for request in wave:
        sent_at[request.id] = time.perf_counter()
        future = await client.submit(request)
        future.add_done_callback(note_answer)
        futures.append(future)
    done, pending = await asyncio.wait(futures, timeout=timeout)
    for future in done:
        response = future.result()
        summary.responses.append(response)
        summary.latencies_ms.append((answered_at[response.id] - sent_at[response.id]) * 1000.0)
    summary.missing += len(pending)


async def run_demo(client: LLMFlowClient, count: int, timeout: float = 120.0) -> Summary:
    workload = build_workload(count, load_prompts(count))
    warm = await client.call(new_request("warm-up", "llmflow-demo"), timeout=timeout)
    if warm.status is Status.ERROR:
        raise RuntimeError(f"the pipeline answered the warm-up with an error: {warm.error}")
    summary = Summary()
    started = time.perf_counter()
    await _send_wave(client, workload.first_wave, timeout, summary)
    await _send_wave(client, workload.second_wave, timeout, summary)
    summary.wall_s = time.perf_counter() - started
    summary.duplicates = client.duplicates
    return summary

"""A load generator for any LLM endpoint: real prompts, Poisson arrivals, a max-rate search.

The workload is built from ShareGPT first turns (`llmflow.prompts`) with a chosen share of
exact duplicates and near-duplicates (an earlier prompt with a short phrase added), so
caching and merging see the repeats real traffic has. Items are plain data: any sender
(the pipeline's client, an HTTP proxy) turns them into its own requests.

`open_loop` sends at Poisson arrival times whatever the answers do (an open loop: a slow
system sees its queue grow, as it would in production); `max_sustained_rate` searches the
highest rate a system keeps up with by running the open loop at rising rates.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tqdm import tqdm

from llmflow.brokers import BROKERS
from llmflow.prompts import load_prompts
from schemas.messages import LLMResponse, Status

Kind = Literal["unique", "duplicate", "near_duplicate"]
NEAR_DUPLICATE_PHRASES = (
    " Thanks.",
    " Please answer briefly.",
    " Can you help me with this?",
    " I would appreciate a clear answer.",
    " Please explain.",
)
LAG_PROBE_S = 0.01


@dataclass(frozen=True)
class WorkItem:
    """One request to send: an OpenAI-style `messages` list, so any client can send it."""

    id: str
    tenant: str
    messages: list[dict[str, str]]
    max_tokens: int
    kind: Kind

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class WorkloadSpec:
    """How many items, and which shares repeat an earlier item exactly or nearly."""

    count: int
    duplicate_share: float = 0.1
    near_duplicate_share: float = 0.1
    tenants: int = 4
    tenant_prefix: str = "tenant"
    max_tokens: int = 64
    seed: int = 0
    max_prompt_chars: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 <= self.duplicate_share + self.near_duplicate_share <= 1.0:
            raise ValueError("duplicate and near-duplicate shares must add up to at most 1")
        if self.count < 0 or self.tenants < 1:
            raise ValueError("count must be >= 0 and tenants >= 1")


def build_workload(spec: WorkloadSpec, prompts: Sequence[str] | None = None) -> list[WorkItem]:
    """`spec.count` items in send order; repeats copy an earlier item's tenant and text.

    The first item is always unique (nothing came before to repeat). ShareGPT holds about
    nine thousand usable first turns: when unique items outnumber them, the prompts go
    round again under new tenant names, which keeps them unique to tenant-scoped caches.
    """
    rng = random.Random(spec.seed)
    pool = (
        list(prompts)
        if prompts is not None
        else load_prompts(max(1, spec.count), spec.max_prompt_chars)
    )
    if not pool:
        raise ValueError("no prompts to build a workload from")
    items: list[WorkItem] = []
    uniques: list[WorkItem] = []
    for index in range(spec.count):
        draw = rng.random()
        if uniques and draw < spec.duplicate_share:
            source = rng.choice(uniques)
            kind: Kind = "duplicate"
            tenant, text = source.tenant, source.prompt
        elif uniques and draw < spec.duplicate_share + spec.near_duplicate_share:
            source = rng.choice(uniques)
            kind, tenant = "near_duplicate", source.tenant
            text = source.prompt + rng.choice(NEAR_DUPLICATE_PHRASES)
        else:
            round_, position = divmod(len(uniques), len(pool))
            kind, text = "unique", pool[position]
            tenant = f"{spec.tenant_prefix}-{rng.randrange(spec.tenants)}"
            tenant += f"-r{round_}" if round_ else ""
        item = WorkItem(
            id=f"{spec.tenant_prefix}-{spec.seed}-{index}",
            tenant=tenant,
            messages=[{"role": "user", "content": text}],
            max_tokens=spec.max_tokens,
            kind=kind,
        )
        if kind == "unique":
            uniques.append(item)
        items.append(item)
    return items


OUTSIDE_STAGES = "outside"


@dataclass(frozen=True)
class Outcome:
    """What a sender learnt from one answer: its status (ok, cached, merged, error_<code>),
    an error's reason, and, where the answer says, the time spent in the model provider and
    in each stage."""

    status: str
    provider_ms: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


def outcome_of(response: LLMResponse) -> Outcome:
    """A merged follower's provider time is its leader's, which its answer does not carry."""
    status = response.status.value
    if response.status is Status.ERROR and response.error is not None:
        status = f"error_{response.error.code.value}"
    provider_ms = None if response.status is Status.MERGED else response.upstream_ms
    reason = None if response.error is None else response.error.reason
    return Outcome(status, provider_ms, dict(response.stage_latency_ms), reason)


@dataclass(frozen=True)
class Sample:
    """One item's trip: when it went, when (if ever) it came back, and what came back."""

    item: WorkItem
    sent_at: float
    answered_at: float | None
    outcome: Outcome

    @property
    def answered(self) -> bool:
        return self.answered_at is not None

    @property
    def latency_ms(self) -> float | None:
        return None if self.answered_at is None else (self.answered_at - self.sent_at) * 1000.0

    @property
    def overhead_ms(self) -> float | None:
        """End-to-end latency less the provider's time; unknown where the sender cannot
        tell the provider time (a merged follower waited on another request's call)."""
        latency = self.latency_ms
        if latency is None or self.outcome.provider_ms is None:
            return None
        return max(0.0, latency - self.outcome.provider_ms)


@dataclass(frozen=True)
class LoadRun:
    """The samples of one open-loop run at `target_rps`; `scheduled_rps` is the rate its
    Poisson schedule came out at (a short run's differs from the target by chance);
    `loop_lag_ms`, how late the sender's event loop woke during the run (`loop_lags`)."""

    target_rps: float
    samples: list[Sample]
    scheduled_rps: float = 0.0
    loop_lag_ms: list[float] = field(default_factory=list)

    @property
    def sent_rps(self) -> float:
        """The rate requests really went out at: a busy sender may fall behind its target."""
        sent = sorted(s.sent_at for s in self.samples)
        span = sent[-1] - sent[0] if len(sent) > 1 else 0.0
        return (len(sent) - 1) / span if span > 0 else 0.0

    @property
    def answered_rps(self) -> float:
        """The rate answers came out at, first to last: below the send rate when a queue
        grows (a constant latency shifts both ends alike)."""
        answered = [s.answered_at for s in self.samples if s.answered_at is not None]
        span = max(answered) - min(answered) if len(answered) > 1 else 0.0
        return (len(answered) - 1) / span if span > 0 else 0.0

    @property
    def answered_share(self) -> float:
        if not self.samples:
            return 0.0
        return sum(s.answered for s in self.samples) / len(self.samples)

    def latencies_ms(self) -> list[float]:
        return [v for s in self.samples if (v := s.latency_ms) is not None]

    def overheads_ms(self) -> list[float]:
        return [v for s in self.samples if (v := s.overhead_ms) is not None]

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.outcome.status] = counts.get(sample.outcome.status, 0) + 1
        return dict(sorted(counts.items()))

    def stage_ms(self) -> dict[str, list[float]]:
        """Each stage's times over the answers that passed it, and under `OUTSIDE_STAGES`
        what their latency spent in none: the request's way to the broker before
        preprocess's clock starts at its record's timestamp, and the answer's way back."""
        stages: dict[str, list[float]] = {}
        for sample in self.samples:
            for stage, spent in sample.outcome.stage_ms.items():
                stages.setdefault(stage, []).append(spent)
            latency = sample.latency_ms
            if latency is not None and sample.outcome.stage_ms:
                outside = latency - sum(sample.outcome.stage_ms.values())
                stages.setdefault(OUTSIDE_STAGES, []).append(outside)
        return stages

    def stage_summaries_ms(self) -> dict[str, dict[str, float]]:
        """Each stage's `summary_ms`, stages in name order."""
        return {stage: summary_ms(times) for stage, times in sorted(self.stage_ms().items())}


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (`share` in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ranked = sorted(values)
    rank = max(1, math.ceil(share * len(ranked)))
    return ranked[min(len(ranked), rank) - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, max and mean, rounded to 0.01 ms; zeros for no values."""
    mean = sum(values) / len(values) if values else 0.0
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values, default=0.0), 2),
        "mean": round(mean, 2),
        "count": len(values),
    }


Send = Callable[[WorkItem], Awaitable[Outcome]]


async def loop_lags(into: list[float]) -> None:
    """How late the loop wakes from a short sleep, in ms, appended until cancelled: a late
    loop sends late and reads answers late, and the latencies measured include that."""
    loop = asyncio.get_running_loop()
    while True:
        asleep_at = loop.time()
        await asyncio.sleep(LAG_PROBE_S)
        into.append((loop.time() - asleep_at - LAG_PROBE_S) * 1000.0)


async def open_loop(
    send: Send,
    items: Sequence[WorkItem],
    rate_rps: float,
    seed: int = 0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> LoadRun:
    """Send `items` at Poisson arrivals of mean rate `rate_rps`, each in its own task.

    Each arrival is slept to on the loop's clock from the start, so a late wake-up sends
    the next item sooner instead of lowering the rate. A send that raises is recorded as
    `error_<exception name>`, one that takes over `timeout_s` as `timeout_client`.
    """
    if rate_rps <= 0:
        raise ValueError("rate_rps must be positive")
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    bar = tqdm(total=len(items), desc=f"{rate_rps:g} req/s", unit="req", disable=not progress)

    async def one(item: WorkItem) -> Sample:
        sent_at = time.time()
        try:
            outcome = await asyncio.wait_for(send(item), timeout_s)
        except TimeoutError:
            return Sample(item, sent_at, None, Outcome("timeout_client"))
        except Exception as exc:
            return Sample(item, sent_at, None, Outcome(f"error_{type(exc).__name__}"))
        finally:
            bar.update()
        return Sample(item, sent_at, time.time(), outcome)

    tasks: list[asyncio.Task[Sample]] = []
    lags: list[float] = []
    # The sender's own full collections, over every sample and item it holds, stalled its
    # loop 50 to 280 ms in an overload run (gc.callbacks), so the answers it timed came
    # late: none run while it sends, and the last one runs before the schedule starts.
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    watcher = asyncio.create_task(loop_lags(lags))
    arrival = first = last = loop.time()
    try:
        for item in items:
            await asyncio.sleep(max(0.0, arrival - loop.time()))
            tasks.append(asyncio.create_task(one(item)))
            last = arrival
            arrival += rng.expovariate(rate_rps)
        samples = await asyncio.gather(*tasks)
    finally:
        if collecting:
            gc.enable()
        for task in [*tasks, watcher]:
            task.cancel()
        bar.close()
    scheduled = (len(items) - 1) / (last - first) if last > first else rate_rps
    return LoadRun(rate_rps, list(samples), scheduled, lags)


@dataclass(frozen=True)
class SustainCriteria:
    """When a run counts as sustained: the sender kept its rate, nearly every request was
    answered, answers kept pace with sends, and the p99 latency stayed under a bound."""

    min_rate_share: float = 0.95
    min_answered_share: float = 0.99
    max_p99_ms: float = 2000.0

    def failures(self, run: LoadRun) -> list[str]:
        """Why `run` was not sustained; empty when it was."""
        reasons = []
        scheduled = (run.scheduled_rps or run.target_rps) * self.min_rate_share
        if run.sent_rps < scheduled:
            reasons.append(f"sent {run.sent_rps:.0f} req/s < {scheduled:.0f}")
        if run.answered_share < self.min_answered_share:
            reasons.append(f"answered {run.answered_share:.1%} < {self.min_answered_share:.0%}")
        kept_pace = run.sent_rps * self.min_rate_share
        if run.answered_rps < kept_pace:
            reasons.append(f"answers {run.answered_rps:.0f} req/s < {kept_pace:.0f}")
        p99 = percentile(run.latencies_ms(), 0.99)
        if p99 > self.max_p99_ms:
            reasons.append(f"p99 {p99:.0f} ms > {self.max_p99_ms:.0f}")
        return reasons


@dataclass(frozen=True)
class Trial:
    rate_rps: float
    sustained: bool
    reasons: list[str]
    run: LoadRun


@dataclass(frozen=True)
class RateSearch:
    """The highest sustained rate found (0 if none was) and every trial that led to it."""

    max_sustained_rps: float
    trials: list[Trial]


async def max_sustained_rate(
    run_at: Callable[[float], Awaitable[LoadRun]],
    criteria: SustainCriteria,
    start_rps: float,
    max_rps: float,
    refine_steps: int = 3,
) -> RateSearch:
    """Double the rate from `start_rps` until a run is not sustained (or `max_rps` is
    reached), then bisect between the last sustained and the first failed rate
    `refine_steps` times. `run_at(rate)` runs one open loop at that rate."""
    trials: list[Trial] = []

    async def attempt(rate: float) -> bool:
        run = await run_at(rate)
        reasons = criteria.failures(run)
        trials.append(Trial(rate, not reasons, reasons, run))
        return not reasons

    good, bad = 0.0, None
    rate = min(start_rps, max_rps)
    while True:
        if not await attempt(rate):
            bad = rate
            break
        good = rate
        if rate >= max_rps:
            break
        rate = min(rate * 2, max_rps)
    if bad is not None:
        low, high = good, bad
        for _ in range(refine_steps):
            middle = (low + high) / 2
            if await attempt(middle):
                low = middle
            else:
                high = middle
        good = low
    return RateSearch(round(good, 1), trials)


def add_broker_argument(parser: argparse.ArgumentParser) -> None:
    """`--broker` for a bench that starts its own stack."""
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="tansu",
        help="the embedded Tansu (its cost grows with every record it holds: "
        "bench broker), or Apache Kafka from scripts/kafka.sh",
    )

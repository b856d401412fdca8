"""Rate limit: token buckets per tenant, per user and per api type, in requests and in LLM
tokens, all kept in one faust Table value under the tenant's key.

The stage topic is keyed by tenant, so every check for one tenant runs on the one partition
that owns all of its buckets, inside one event: the limits hold however many workers there
are, and a request is admitted only when every one of its buckets has room (all or nothing:
a refusal takes from none of them). A request costs one request and prompt_tokens +
max_tokens tokens, charged at admission: the most it can use, never refunded, and charged
once: a request handled again after a crash or rebalance (at-least-once redelivery, here or
in preprocess) goes on uncharged.

Normal and low priority may use 1 - reserve of each bucket, high priority all of it. The
rate buckets refill at follows this worker's load: an AIMD controller lowers it while the
worker's stages queue requests for longer than a target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from faust.types import EventT
from prometheus_client import Histogram

from schemas.messages import Envelope, ErrorCode, LLMRequest, Priority
from streams import metrics
from streams.app import Pipeline
from topology.settings import AdaptiveLimit, Quota, RateLimit

STAGE = "ratelimit"
TABLE = "ratelimit-buckets"


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_at: float

    def to_json(self) -> list[float]:
        return [self.tokens, self.updated_at]

    @classmethod
    def from_json(cls, value: list[float]) -> Bucket:
        return cls(tokens=float(value[0]), updated_at=float(value[1]))


def refill(bucket: Bucket | None, limit: RateLimit, now: float, rate_scale: float) -> Bucket:
    """The bucket at `now`: full when new, else topped up for the time passed, capped at
    its burst."""
    if bucket is None:
        return Bucket(limit.burst, now)
    elapsed = max(0.0, now - bucket.updated_at)
    tokens = min(limit.burst, bucket.tokens + elapsed * limit.per_second * rate_scale)
    # A worker whose clock runs behind must not rewind the bucket and mint tokens later.
    return Bucket(tokens, max(now, bucket.updated_at))


@dataclass(frozen=True)
class Charge:
    """What a request takes from one of its tenant's buckets."""

    key: str  # where the bucket lives in the tenant's Table value
    limit_name: str  # the limit's name in refusals and metrics, e.g. "user_tokens"
    limit: RateLimit
    cost: float


def charges(quota: Quota, request: LLMRequest, prompt_tokens: int) -> list[Charge]:
    """Every bucket of `quota` that `request` draws from, and how much."""
    tokens = float(prompt_tokens + request.params.max_tokens)
    scopes = [("tenant", "", quota.tenant), ("user", request.user, quota.user)]
    api_type = quota.api_types.get(request.api_type)
    if api_type is not None:
        scopes.append(("api_type", request.api_type, api_type))
    return [
        Charge(f"{scope}:{unit}:{name}", f"{scope}_{unit}", limit, cost)
        for scope, name, rates in scopes
        for unit, limit, cost in (
            ("requests", rates.requests, 1.0),
            ("tokens", rates.tokens, tokens),
        )
        if limit is not None
    ]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    buckets: dict[str, Bucket]  # the charged buckets after this request
    retry_after_s: float | None = None  # refused: None when the request can never fit
    refused_by: Charge | None = None


def admit(
    buckets: Mapping[str, Bucket],
    wanted: Iterable[Charge],
    now: float,
    priority: Priority,
    reserve: float,
    rate_scale: float = 1.0,
) -> Decision:
    """Take every charge, or none. Refused, the retry-after is the longest wait any bucket
    needs to hold the request's cost above its reserve."""
    wanted = list(wanted)
    levels = {c.key: refill(buckets.get(c.key), c.limit, now, rate_scale) for c in wanted}
    refused_by: Charge | None = None
    longest = 0.0
    for charge in wanted:
        floor = 0.0 if priority is Priority.HIGH else reserve * charge.limit.burst
        need = charge.cost + floor
        missing = need - levels[charge.key].tokens
        if missing <= 0:
            continue
        wait = (
            math.inf
            if need > charge.limit.burst
            else missing / (charge.limit.per_second * rate_scale)
        )
        if refused_by is None or wait > longest:
            refused_by, longest = charge, wait
    if refused_by is not None:
        retry_after = None if math.isinf(longest) else longest
        return Decision(False, levels, retry_after, refused_by)
    taken = {c.key: Bucket(levels[c.key].tokens - c.cost, levels[c.key].updated_at) for c in wanted}
    return Decision(True, taken)


@dataclass
class TenantState:
    """A tenant's Table value: its buckets, and for each partition of llm.requests the
    offset of the last request from there that charged them, with when.

    Preprocess handles each partition of llm.requests in offset order and passes the
    requests on in that order; a request it handles again after a crash or rebalance
    keeps its offset there (`Envelope.origin_offset`). The value is written with every
    charge, so a request at or below the offset kept for its partition was charged
    already. The time bounds that knowledge: a topic made anew restarts at offset 0.
    """

    buckets: dict[str, Bucket]
    charged: dict[str, tuple[int, float]]

    def redelivered(self, source: str, offset: int, now: float, window_s: float) -> bool:
        last = self.charged.get(source)
        return last is not None and offset <= last[0] and now - last[1] <= window_s

    def mark(self, source: str, offset: int, now: float) -> None:
        self.charged[source] = (offset, now)

    def to_json(self) -> dict[str, object]:
        return {
            "buckets": {key: b.to_json() for key, b in self.buckets.items()},
            "charged": {source: list(last) for source, last in self.charged.items()},
        }

    @classmethod
    def from_json(cls, stored: object) -> TenantState:
        """Also reads the values this stage kept before: a dict of buckets, or a bare pair,
        the single request bucket, read as the tenant's request bucket."""
        if stored is None:
            return cls({}, {})
        if isinstance(stored, list):
            return cls({"tenant:requests:": Bucket.from_json(stored)}, {})
        assert isinstance(stored, dict)
        if "buckets" not in stored:
            return cls(_buckets(stored), {})
        charged = {s: (int(last[0]), float(last[1])) for s, last in stored["charged"].items()}
        return cls(_buckets(stored["buckets"]), charged)


def _buckets(stored: dict[str, list[float]]) -> dict[str, Bucket]:
    return {key: Bucket.from_json(value) for key, value in stored.items()}


def bound(buckets: dict[str, Bucket], now: float, full_after_s: float, most: int) -> int:
    """Drop buckets untouched for `full_after_s` (full again, so the same as absent), then
    the least recently used beyond `most`; returns how many went before they were full."""
    for key in [k for k, b in buckets.items() if now - b.updated_at >= full_after_s]:
        del buckets[key]
    over = len(buckets) - most
    if over <= 0:
        return 0
    for key in sorted(buckets, key=lambda k: buckets[k].updated_at)[:over]:
        del buckets[key]
    return over


class Aimd:
    """Additive increase, multiplicative decrease of the share of the configured refill
    rates that a worker lets through: cut while its load is over target, regrown after."""

    def __init__(self, settings: AdaptiveLimit) -> None:
        self.settings = settings
        self.scale = 1.0

    def update(self, load_s: float | None) -> float:
        """One step for the load seen over the last interval (None: no request passed)."""
        s = self.settings
        if load_s is not None and load_s > s.target_s:
            self.scale = max(s.min_scale, self.scale * s.decrease)
        else:
            self.scale = min(1.0, self.scale + s.increase)
        return self.scale


class StageQueueing:
    """How long this worker's requests queued since the last reading: the mean latency of
    each watched stage over the interval, summed (consumer lag, in seconds). Read from the
    stage latency histogram the worker already exports."""

    def __init__(self, histogram: Histogram, stages: Iterable[str]) -> None:
        self.histogram = histogram
        self.stages = set(stages)
        self.seen: dict[str, tuple[float, float]] = {}

    def totals(self) -> dict[str, tuple[float, float]]:
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for family in self.histogram.collect():
            for sample in family.samples:
                stage = sample.labels.get("stage", "")
                if stage not in self.stages:
                    continue
                if sample.name.endswith("_sum"):
                    sums[stage] = sample.value
                elif sample.name.endswith("_count"):
                    counts[stage] = sample.value
        return {stage: (sums.get(stage, 0.0), counts[stage]) for stage in counts}

    def read(self) -> float | None:
        """The summed mean latency since the last reading; None when no request passed."""
        now = self.totals()
        load: float | None = None
        for stage, (total, count) in now.items():
            seen_total, seen_count = self.seen.get(stage, (0.0, 0.0))
            if count > seen_count:
                load = (load or 0.0) + (total - seen_total) / (count - seen_count)
        self.seen = now
        return load


def origin(envelope: Envelope, event: EventT[bytes]) -> tuple[str, int]:
    """Where the request came from and at which offset: its place in llm.requests, or,
    for an envelope that lacks one, the event at hand."""
    if envelope.origin_partition is None or envelope.origin_offset is None:
        return f"{event.message.topic}:{event.message.partition}", event.message.offset
    return f"requests:{envelope.origin_partition}", envelope.origin_offset


def attach(pipeline: Pipeline) -> None:
    limits = pipeline.settings.ratelimit
    adaptive = limits.adaptive
    table = pipeline.table(TABLE)
    controller = Aimd(adaptive)
    lowest_scale = adaptive.min_scale if adaptive.enabled else 1.0

    async def ratelimit(event: EventT[bytes], envelope: Envelope) -> None:
        request = envelope.request
        quota = limits.for_tenant(request.tenant)
        now = envelope.stage_entered_at
        state = TenantState.from_json(table.get(request.tenant))
        source, offset = origin(envelope, event)
        if state.redelivered(source, offset, now, limits.redelivery_window_s):
            metrics.stage_events.labels(STAGE, "redelivered").inc()
            await pipeline.send("dedup", envelope)
            return
        buckets = state.buckets
        decision = admit(
            buckets,
            charges(quota, request, envelope.prompt_tokens),
            now,
            request.priority,
            quota.reserve,
            controller.scale,
        )
        buckets.update(decision.buckets)
        full_after_s = quota.longest_refill_s() / lowest_scale
        evicted = bound(buckets, now, full_after_s, limits.max_buckets_per_tenant)
        metrics.ratelimit_evictions.inc(evicted)
        state.mark(source, offset, now)
        table[request.tenant] = state.to_json()
        if decision.allowed:
            metrics.stage_events.labels(STAGE, "allowed").inc()
            await pipeline.send("dedup", envelope)
            return
        refused = decision.refused_by
        assert refused is not None
        metrics.stage_events.labels(STAGE, "rate_limited").inc()
        metrics.ratelimit_refusals.labels(refused.limit_name, request.priority.value).inc()
        if decision.retry_after_s is None:
            message = f"the request needs more than the {refused.limit_name} limit ever allows"
            retry_after = None
        else:
            message = f"over the {refused.limit_name} limit of {refused.limit.per_second:g}/s"
            retry_after = math.ceil(decision.retry_after_s * 1000) / 1000
        await pipeline.fail(
            envelope, ErrorCode.RATE_LIMITED, refused.limit_name, message, retry_after
        )

    pipeline.stage_agent(STAGE, ratelimit)
    metrics.ratelimit_scale.set(controller.scale)
    if not adaptive.enabled:
        return
    signal = StageQueueing(metrics.stage_latency, adaptive.stages)

    async def adapt() -> None:
        load = signal.read()
        metrics.ratelimit_load.set(load or 0.0)
        metrics.ratelimit_scale.set(controller.update(load))

    pipeline.app.timer(adaptive.interval_s)(adapt)

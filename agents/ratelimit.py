"""Rate limit: a token bucket per tenant, kept in a faust Table keyed by tenant.

The stage topic is keyed by tenant too, so every check for one tenant runs on the one
partition that owns its bucket: the limit holds however many workers there are.
"""

from __future__ import annotations

from dataclasses import dataclass

from faust.types import EventT

from schemas.messages import Envelope, ErrorCode
from streams import metrics
from streams.app import Pipeline
from topology.settings import RateLimit

STAGE = "ratelimit"


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_at: float

    def to_json(self) -> list[float]:
        return [self.tokens, self.updated_at]

    @classmethod
    def from_json(cls, value: list[float]) -> Bucket:
        return cls(tokens=float(value[0]), updated_at=float(value[1]))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    bucket: Bucket
    retry_after_s: float


def take(bucket: Bucket | None, limit: RateLimit, now: float, cost: float = 1.0) -> Decision:
    """Refill for the time passed, then take `cost` tokens if there are enough."""
    if bucket is None:
        tokens = limit.burst
    else:
        elapsed = max(0.0, now - bucket.updated_at)
        tokens = min(limit.burst, bucket.tokens + elapsed * limit.per_second)
        # A worker whose clock runs behind must not rewind the bucket and mint tokens later.
        now = max(now, bucket.updated_at)
    if tokens >= cost:
        return Decision(True, Bucket(tokens - cost, now), 0.0)
    retry_after = (cost - tokens) / limit.per_second
    return Decision(False, Bucket(tokens, now), retry_after)


def attach(pipeline: Pipeline) -> None:
    limits = pipeline.settings.ratelimit
    buckets = pipeline.table("ratelimit-buckets")

    async def ratelimit(_event: EventT[bytes], envelope: Envelope) -> None:
        tenant = envelope.request.tenant
        limit = limits.for_tenant(tenant)
        stored = buckets.get(tenant)
        bucket = Bucket.from_json(stored) if stored is not None else None
        decision = take(bucket, limit, envelope.stage_entered_at)
        buckets[tenant] = decision.bucket.to_json()
        if decision.allowed:
            metrics.stage_events.labels(STAGE, "allowed").inc()
            await pipeline.send("dedup", envelope)
            return
        metrics.stage_events.labels(STAGE, "rate_limited").inc()
        await pipeline.fail(
            envelope,
            ErrorCode.RATE_LIMITED,
            "tenant_request_rate",
            f"tenant {tenant!r} is over its limit of {limit.per_second:g} requests/s",
            retry_after_s=round(decision.retry_after_s, 3),
        )

    pipeline.stage_agent(STAGE, ratelimit)

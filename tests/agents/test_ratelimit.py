"""Rate limit logic: bucket refill, all-or-nothing admission over a tenant's buckets, the
priority reserve, the bound on buckets per tenant, and the adaptive rate under load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import pytest
from faust.types import EventT
from prometheus_client import CollectorRegistry, Histogram

from agents.ratelimit import (
    Aimd,
    Bucket,
    Charge,
    StageQueueing,
    TenantState,
    admit,
    bound,
    charges,
    origin,
    refill,
)
from schemas.messages import (
    ChatMessage,
    Envelope,
    GenerationParams,
    LLMRequest,
    Priority,
    Role,
)
from topology.settings import AdaptiveLimit, Quota, RateLimit, Rates

LIMIT = RateLimit(burst=3.0, per_second=2.0)
NORMAL = Priority.NORMAL
HIGH = Priority.HIGH


def one(cost: float = 1.0, limit: RateLimit = LIMIT, key: str = "tenant:requests:") -> Charge:
    return Charge(key, "tenant_requests", limit, cost)


def request(user: str = "ann", api_type: str = "chat", max_tokens: int = 100) -> LLMRequest:
    return LLMRequest(
        id="r1",
        tenant="acme",
        user=user,
        api_type=api_type,
        messages=[ChatMessage(role=Role.USER, content="hi")],
        params=GenerationParams(max_tokens=max_tokens),
    )


# --- refill -------------------------------------------------------------------------------


def test_a_new_bucket_is_full() -> None:
    assert refill(None, LIMIT, now=100.0, rate_scale=1.0) == Bucket(3.0, 100.0)


def test_refill_over_time_is_capped_at_the_burst() -> None:
    empty = Bucket(tokens=0.0, updated_at=100.0)
    assert refill(empty, LIMIT, 100.25, 1.0).tokens == pytest.approx(0.5)
    assert refill(empty, LIMIT, 10_000.0, 1.0).tokens == LIMIT.burst
    assert refill(Bucket(50.0, 0.0), LIMIT, 0.0, 1.0).tokens == LIMIT.burst  # burst lowered


def test_rate_scale_slows_the_refill() -> None:
    assert refill(Bucket(0.0, 0.0), LIMIT, 1.0, 0.25).tokens == pytest.approx(0.5)


def test_clock_going_backwards_adds_no_tokens_now_or_later() -> None:
    bucket = Bucket(tokens=0.0, updated_at=100.0)
    skewed = refill(bucket, LIMIT, 90.0, 1.0)  # an event stamped by a worker 10 s behind
    assert skewed == bucket
    assert refill(skewed, LIMIT, 100.0, 1.0).tokens == 0.0  # no time really passed


# --- admission ----------------------------------------------------------------------------


def test_burst_allowed_then_refused_with_retry_after() -> None:
    buckets: dict[str, Bucket] = {}
    for expected_left in (2.0, 1.0, 0.0):
        decision = admit(buckets, [one()], 100.0, NORMAL, reserve=0.0)
        assert decision.allowed and decision.retry_after_s is None
        assert decision.buckets["tenant:requests:"].tokens == pytest.approx(expected_left)
        buckets.update(decision.buckets)
    refused = admit(buckets, [one()], 100.0, NORMAL, reserve=0.0)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.5)  # one token at 2/s
    assert refused.refused_by == one()
    assert refused.buckets["tenant:requests:"] == Bucket(0.0, 100.0)


def test_retry_after_counts_the_partial_token_and_the_rate_scale() -> None:
    buckets = {"tenant:requests:": Bucket(tokens=0.25, updated_at=10.0)}
    decision = admit(buckets, [one()], 10.0, NORMAL, reserve=0.0)
    assert decision.retry_after_s == pytest.approx((1 - 0.25) / 2.0)
    halved = admit(buckets, [one()], 10.0, NORMAL, reserve=0.0, rate_scale=0.5)
    assert halved.retry_after_s == pytest.approx((1 - 0.25) / 1.0)


def test_cost_above_one() -> None:
    buckets = {"tenant:requests:": Bucket(tokens=2.0, updated_at=0.0)}
    refused = admit(buckets, [one(cost=3.0)], 0.0, NORMAL, reserve=0.0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.5)
    buckets = {"tenant:requests:": Bucket(tokens=3.0, updated_at=0.0)}
    assert admit(buckets, [one(cost=3.0)], 0.0, NORMAL, reserve=0.0).allowed


def test_normal_priority_leaves_the_reserve_to_high_priority() -> None:
    limit = RateLimit(burst=10.0, per_second=1.0)
    buckets: dict[str, Bucket] = {}
    allowed = {NORMAL: 0, HIGH: 0}
    for priority in [NORMAL] * 12 + [HIGH] * 4:
        decision = admit(buckets, [one(limit=limit)], 0.0, priority, reserve=0.2)
        buckets.update(decision.buckets)
        allowed[priority] += decision.allowed
    assert allowed == {NORMAL: 8, HIGH: 2}
    refused = admit(buckets, [one(limit=limit)], 0.0, NORMAL, reserve=0.2)
    assert refused.retry_after_s == pytest.approx(3.0)  # 1 token + a reserve of 2, at 1/s


def test_a_request_larger_than_the_bucket_is_refused_without_retry_after() -> None:
    decision = admit({}, [one(cost=4.0)], 0.0, HIGH, reserve=0.2)
    assert not decision.allowed and decision.retry_after_s is None
    # 2.5 fits the whole bucket but not the part normal priority may use
    assert admit({}, [one(cost=2.5)], 0.0, HIGH, reserve=0.2).allowed
    assert admit({}, [one(cost=2.5)], 0.0, NORMAL, reserve=0.2).retry_after_s is None


def test_a_refusal_takes_from_none_of_the_buckets() -> None:
    roomy = one(key="tenant:requests:")
    empty_user = Charge("user:requests:ann", "user_requests", LIMIT, 1.0)
    buckets = {"user:requests:ann": Bucket(0.0, 5.0)}
    decision = admit(buckets, [roomy, empty_user], 5.0, NORMAL, reserve=0.0)
    assert not decision.allowed and decision.refused_by == empty_user
    assert decision.buckets["tenant:requests:"].tokens == LIMIT.burst


def test_retry_after_is_the_longest_wait_of_the_refusing_buckets() -> None:
    slow = Charge("tenant:tokens:", "tenant_tokens", RateLimit(burst=100, per_second=10), 50.0)
    buckets = {"tenant:requests:": Bucket(0.0, 0.0), "tenant:tokens:": Bucket(0.0, 0.0)}
    decision = admit(buckets, [one(), slow], 0.0, HIGH, reserve=0.0)
    assert decision.refused_by == slow
    assert decision.retry_after_s == pytest.approx(5.0)


def test_charges_cover_tenant_user_and_api_type_in_requests_and_tokens() -> None:
    requests, tokens = RateLimit(burst=5, per_second=1), RateLimit(burst=1000, per_second=100)
    quota = Quota(
        tenant=Rates(requests=requests, tokens=tokens),
        user=Rates(requests=requests),
        api_types={"embeddings": Rates(tokens=tokens)},
    )
    found = charges(quota, request(user="ann", api_type="embeddings", max_tokens=100), 20)
    assert [(c.key, c.limit_name, c.cost) for c in found] == [
        ("tenant:requests:", "tenant_requests", 1.0),
        ("tenant:tokens:", "tenant_tokens", 120.0),  # prompt + max_tokens
        ("user:requests:ann", "user_requests", 1.0),
        ("api_type:tokens:embeddings", "api_type_tokens", 120.0),
    ]
    assert len(charges(quota, request(api_type="chat"), 20)) == 3  # no chat limit


def test_each_user_has_a_bucket_and_all_share_the_tenant_one() -> None:
    quota = Quota(
        tenant=Rates(requests=RateLimit(burst=3, per_second=0.001)),
        user=Rates(requests=RateLimit(burst=2, per_second=0.001)),
        reserve=0.0,
    )
    buckets: dict[str, Bucket] = {}
    outcomes = []
    for user in ("ann", "ann", "ann", "bob", "bob"):
        decision = admit(buckets, charges(quota, request(user=user), 0), 0.0, NORMAL, 0.0)
        buckets.update(decision.buckets)
        name = decision.refused_by.limit_name if decision.refused_by else "ok"
        outcomes.append(name)
    assert outcomes == ["ok", "ok", "user_requests", "ok", "tenant_requests"]


# --- the Table value ----------------------------------------------------------------------


def test_the_tenant_state_round_trips_through_the_table_value() -> None:
    buckets = {"tenant:requests:": Bucket(1.25, 1_700_000_000.5), "user:tokens:ann": Bucket(3, 2)}
    state = TenantState(buckets, {"llm.stage.ratelimit:2": (41, 1_700_000_000.5)})
    assert TenantState.from_json(json.loads(json.dumps(state.to_json()))) == state
    assert TenantState.from_json(None) == TenantState({}, {})


def test_earlier_values_read_as_buckets_with_nothing_charged() -> None:
    assert TenantState.from_json([3, 12]) == TenantState(
        {"tenant:requests:": Bucket(3.0, 12.0)}, {}
    )
    buckets_only = {"user:tokens:ann": [3, 2]}
    assert TenantState.from_json(buckets_only) == TenantState({"user:tokens:ann": Bucket(3, 2)}, {})


def test_an_event_at_or_below_the_charged_offset_of_its_source_is_redelivered() -> None:
    state = TenantState({}, {})
    assert not state.redelivered("t:0", 0, now=100.0, window_s=300.0)
    state.mark("t:0", 7, now=100.0)
    assert state.redelivered("t:0", 7, now=101.0, window_s=300.0)
    assert state.redelivered("t:0", 5, now=101.0, window_s=300.0)
    assert not state.redelivered("t:0", 8, now=101.0, window_s=300.0)
    assert not state.redelivered("t:1", 5, now=101.0, window_s=300.0)


@dataclass
class Message:
    topic: str
    partition: int
    offset: int


@dataclass
class Event:
    message: Message


def test_a_request_is_known_by_its_place_in_llm_requests_else_by_the_event_at_hand() -> None:
    event = cast(EventT[bytes], Event(Message("llm.stage.ratelimit", 1, 90)))
    envelope = Envelope(request=request())
    assert origin(envelope, event) == ("llm.stage.ratelimit:1", 90)
    envelope.origin_partition, envelope.origin_offset = 3, 17
    assert origin(envelope, event) == ("requests:3", 17)


def test_an_old_charge_says_nothing_of_a_source_topic_made_anew() -> None:
    state = TenantState({}, {"t:0": (900, 100.0)})
    assert state.redelivered("t:0", 3, now=400.0, window_s=300.0)
    assert not state.redelivered("t:0", 3, now=400.1, window_s=300.0)


def test_bound_drops_refilled_buckets_then_the_least_recently_used() -> None:
    buckets = {f"user:requests:{i}": Bucket(0.0, float(i)) for i in range(10)}
    assert bound(buckets, now=10.0, full_after_s=5.0, most=100) == 0
    assert sorted(b.updated_at for b in buckets.values()) == [6.0, 7.0, 8.0, 9.0]
    assert bound(buckets, now=10.0, full_after_s=5.0, most=2) == 2
    assert sorted(b.updated_at for b in buckets.values()) == [8.0, 9.0]


# --- adaptive -----------------------------------------------------------------------------

ADAPTIVE = AdaptiveLimit(target_s=1.0, decrease=0.5, increase=0.25, min_scale=0.125)


def test_aimd_cuts_under_load_to_its_floor_and_regrows_after() -> None:
    aimd = Aimd(ADAPTIVE)
    assert [aimd.update(2.0) for _ in range(5)] == [0.5, 0.25, 0.125, 0.125, 0.125]
    assert [aimd.update(0.5) for _ in range(4)] == [0.375, 0.625, 0.875, 1.0]
    assert aimd.update(None) == 1.0


def histogram() -> Histogram:
    return Histogram("latency_seconds", "test", ["stage"], registry=CollectorRegistry())


def test_stage_queueing_sums_the_mean_latency_of_watched_stages_per_interval() -> None:
    latency = histogram()
    signal = StageQueueing(latency, ["ratelimit", "batch"])
    assert signal.read() is None
    for seconds in (0.1, 0.3):
        latency.labels("ratelimit").observe(seconds)
    latency.labels("batch").observe(1.0)
    latency.labels("infer").observe(9.0)  # not watched
    assert signal.read() == pytest.approx(0.2 + 1.0)
    assert signal.read() is None  # nothing new
    latency.labels("batch").observe(3.0)
    assert signal.read() == pytest.approx(3.0)


def test_adaptive_limit_moves_under_injected_load() -> None:
    """Stage latency injected into the histogram a worker exports lowers the scale, which
    admits fewer of a steady stream of requests; once the load goes, the limit comes back."""
    latency = histogram()
    signal = StageQueueing(latency, ["batch"])
    aimd = Aimd(ADAPTIVE)
    limit = RateLimit(burst=2.0, per_second=8.0)  # steps of 1/128: exact in binary

    def admitted_in_one_second(start: float, injected_s: float) -> int:
        """128 requests over one second, then the controller's step for that second."""
        buckets: dict[str, Bucket] = {"tenant:requests:": Bucket(0.0, start)}
        admitted = 0
        for i in range(1, 129):
            now = start + i / 128
            decision = admit(buckets, [one(limit=limit)], now, NORMAL, 0.0, aimd.scale)
            buckets.update(decision.buckets)
            admitted += decision.allowed
            latency.labels("batch").observe(injected_s)
        aimd.update(signal.read())
        return admitted

    calm = [admitted_in_one_second(float(t), 0.05) for t in range(2)]
    loaded = [admitted_in_one_second(float(t), 3.0) for t in range(2, 6)]
    recovered = [admitted_in_one_second(float(t), 0.05) for t in range(6, 12)]
    assert calm == [8, 8]
    assert loaded == [8, 4, 2, 1]  # scale 1, 0.5, 0.25, 0.125
    assert recovered == [1, 3, 5, 7, 8, 8]  # the load is gone: +0.25 a second

"""Token bucket `take`: burst, refusal with retry_after, refill, cap, clock skew."""

from __future__ import annotations

import json

import pytest

from agents.ratelimit import Bucket, take
from topology.settings import RateLimit

LIMIT = RateLimit(burst=3.0, per_second=2.0)


def test_first_request_starts_from_a_full_bucket() -> None:
    decision = take(None, LIMIT, now=100.0)
    assert decision.allowed
    assert decision.retry_after_s == 0.0
    assert decision.bucket == Bucket(tokens=2.0, updated_at=100.0)


def test_burst_allowed_then_refused_with_retry_after() -> None:
    bucket = None
    for expected_left in (2.0, 1.0, 0.0):
        decision = take(bucket, LIMIT, now=100.0)
        assert decision.allowed
        assert decision.bucket.tokens == pytest.approx(expected_left)
        bucket = decision.bucket
    refused = take(bucket, LIMIT, now=100.0)
    assert not refused.allowed
    # (1 - tokens) / per_second with tokens = 0
    assert refused.retry_after_s == pytest.approx(0.5)
    assert refused.bucket == Bucket(tokens=0.0, updated_at=100.0)


def test_retry_after_counts_the_partial_token() -> None:
    decision = take(Bucket(tokens=0.25, updated_at=10.0), LIMIT, now=10.0)
    assert not decision.allowed
    assert decision.retry_after_s == pytest.approx((1 - 0.25) / 2.0)
    assert decision.bucket.tokens == pytest.approx(0.25)


def test_refill_over_time() -> None:
    empty = Bucket(tokens=0.0, updated_at=100.0)
    assert not take(empty, LIMIT, now=100.25).allowed  # 0.5 tokens
    decision = take(empty, LIMIT, now=100.5)  # 1.0 token
    assert decision.allowed
    assert decision.bucket.tokens == pytest.approx(0.0)
    assert decision.bucket.updated_at == 100.5


def test_refill_never_exceeds_burst() -> None:
    decision = take(Bucket(tokens=0.0, updated_at=0.0), LIMIT, now=10_000.0)
    assert decision.allowed
    assert decision.bucket.tokens == pytest.approx(LIMIT.burst - 1)


def test_stored_tokens_above_a_lowered_burst_are_capped() -> None:
    decision = take(Bucket(tokens=50.0, updated_at=0.0), LIMIT, now=0.0)
    assert decision.bucket.tokens == pytest.approx(LIMIT.burst - 1)


def test_clock_going_backwards_adds_no_tokens() -> None:
    bucket = Bucket(tokens=0.0, updated_at=100.0)
    decision = take(bucket, LIMIT, now=90.0)
    assert not decision.allowed
    assert decision.bucket.tokens == 0.0
    assert decision.retry_after_s == pytest.approx(0.5)


def test_clock_going_backwards_then_forwards_refills_only_real_time() -> None:
    bucket = Bucket(tokens=0.0, updated_at=100.0)
    skewed = take(bucket, LIMIT, now=90.0)  # an event stamped by a worker 10 s behind
    decision = take(skewed.bucket, LIMIT, now=100.0)  # no time has really passed since 100.0
    assert not decision.allowed


def test_cost_above_one() -> None:
    decision = take(Bucket(tokens=2.0, updated_at=0.0), LIMIT, now=0.0, cost=3.0)
    assert not decision.allowed
    assert decision.retry_after_s == pytest.approx(0.5)
    decision = take(Bucket(tokens=3.0, updated_at=0.0), LIMIT, now=0.0, cost=3.0)
    assert decision.allowed
    assert decision.bucket.tokens == 0.0


def test_bucket_json_round_trip() -> None:
    bucket = Bucket(tokens=1.25, updated_at=1_700_000_000.5)
    encoded = json.loads(json.dumps(bucket.to_json()))
    assert encoded == [1.25, 1_700_000_000.5]
    assert Bucket.from_json(encoded) == bucket


def test_bucket_from_json_accepts_ints() -> None:
    bucket = Bucket.from_json([3, 12])
    assert bucket == Bucket(tokens=3.0, updated_at=12.0)
    assert isinstance(bucket.tokens, float)

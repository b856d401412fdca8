"""Adaptive throttling: a client sends about k times what the pipeline accepts."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from llmflow.throttle import AdaptiveThrottle
from tests.clock import FakeClock


def throttle_of(
    draw: Callable[[], float],
    clock: FakeClock | None = None,
    min_requests: int = 0,
    max_probability: float = 1.0,
) -> AdaptiveThrottle:
    """k = 2 over 10 s; no minimum and no cap unless given."""
    return AdaptiveThrottle(2.0, 10.0, min_requests, max_probability, clock or FakeClock(), draw)


def overloaded(throttle: AdaptiveThrottle, count: int) -> None:
    for _ in range(count):
        throttle.answered(accepted=False)


def test_nothing_is_refused_while_the_pipeline_accepts_everything() -> None:
    throttle = throttle_of(lambda: 0.0)
    for _ in range(1000):
        assert throttle.admit()
        throttle.answered(accepted=True)
    assert throttle.refusal_probability() == 0.0


def test_requests_in_flight_are_no_sign_of_overload() -> None:
    throttle = throttle_of(lambda: 0.0)
    assert all(throttle.admit() for _ in range(1000))


def test_with_nothing_accepted_the_refusal_probability_nears_one() -> None:
    throttle = throttle_of(lambda: 0.999)
    overloaded(throttle, 999)
    assert throttle.refusal_probability() == 999 / 1000
    assert throttle.admit()


def test_a_request_is_refused_when_the_draw_falls_under_the_probability() -> None:
    draws = iter([0.6, 0.4])
    throttle = throttle_of(lambda: next(draws))
    overloaded(throttle, 1)
    assert throttle.refusal_probability() == 0.5
    assert throttle.admit()
    assert not throttle.admit()


def test_accepts_outweigh_overloaded_answers_k_to_one() -> None:
    throttle = throttle_of(lambda: 0.0)
    for _ in range(100):
        throttle.answered(accepted=True)
    overloaded(throttle, 100)
    assert throttle.refusal_probability() == 0.0
    overloaded(throttle, 10)
    assert throttle.refusal_probability() == 10 / 211


def test_high_priority_is_never_refused() -> None:
    throttle = throttle_of(lambda: 0.0)
    overloaded(throttle, 100)
    assert throttle.refusal_probability() > 0.9
    assert all(throttle.admit(refusable=False) for _ in range(100))


def test_counts_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    throttle = throttle_of(lambda: 0.0, clock)
    overloaded(throttle, 500)
    assert throttle.refusal_probability() > 0.99
    clock.now += 9.0
    assert throttle.refusal_probability() > 0.99
    clock.now += 1.0
    assert throttle.refusal_probability() == 0.0
    assert throttle.admit()


def test_a_client_with_fewer_answers_than_the_minimum_refuses_none() -> None:
    clock = FakeClock()
    throttle = throttle_of(lambda: 0.0, clock, min_requests=50)
    overloaded(throttle, 49)
    assert throttle.admit()
    overloaded(throttle, 1)
    assert not throttle.admit()


def test_the_refusal_probability_is_capped() -> None:
    throttle = throttle_of(lambda: 0.95, max_probability=0.9)
    overloaded(throttle, 1000)
    assert throttle.refusal_probability() == 0.9
    assert throttle.admit()


@pytest.mark.parametrize(
    ("accepted_per_s", "max_probability", "sent_per_s"),
    [(100, 1.0, (190, 215)), (100, 0.9, (190, 215)), (20, 0.9, (90, 115))],
)
def test_under_overload_the_client_sends_k_times_the_accepted_or_the_capped_share(
    accepted_per_s: int, max_probability: float, sent_per_s: tuple[int, int]
) -> None:
    """1,000 requests a second offered; the pipeline accepts `accepted_per_s` of those sent
    and answers the rest `overloaded`; a refused request is counted as answered. The
    client sends the larger of k = 2 times the accepted and 1 - max_probability of 1,000."""
    clock = FakeClock()
    throttle = throttle_of(random.Random(7).random, clock, max_probability=max_probability)
    sent_per_second = []
    for _ in range(60):
        sent = accepted = 0
        for _ in range(1000):
            clock.now += 0.001
            if throttle.admit():
                sent += 1
                throttle.answered(accepted=accepted < accepted_per_s)
                accepted += 1
            else:
                throttle.answered(accepted=False)
        sent_per_second.append(sent)
    steady = sent_per_second[20:]
    low, high = sent_per_s
    assert low <= sum(steady) / len(steady) <= high, steady

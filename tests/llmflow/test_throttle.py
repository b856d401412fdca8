"""Adaptive throttling: a client sends about k times what the pipeline accepts."""

from __future__ import annotations

import random

from llmflow.throttle import AdaptiveThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def overloaded(throttle: AdaptiveThrottle, count: int) -> None:
    for _ in range(count):
        throttle.answered(accepted=False)


def test_nothing_is_refused_while_the_pipeline_accepts_everything() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: 0.0)
    for _ in range(1000):
        assert throttle.admit()
        throttle.answered(accepted=True)
    assert throttle.refused == 0 and throttle.refusal_probability() == 0.0


def test_requests_in_flight_are_no_sign_of_overload() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: 0.0)
    assert all(throttle.admit() for _ in range(1000))


def test_with_nothing_accepted_the_refusal_probability_nears_one() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: 0.999)
    overloaded(throttle, 999)
    assert throttle.refusal_probability() == 999 / 1000
    assert throttle.admit()


def test_a_request_is_refused_when_the_draw_falls_under_the_probability() -> None:
    draws = iter([0.6, 0.4])
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: next(draws))
    overloaded(throttle, 1)
    assert throttle.refusal_probability() == 0.5
    assert throttle.admit()
    assert not throttle.admit()
    assert throttle.refused == 1


def test_accepts_outweigh_overloaded_answers_k_to_one() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: 0.0)
    for _ in range(100):
        throttle.answered(accepted=True)
    overloaded(throttle, 100)
    assert throttle.refusal_probability() == 0.0
    overloaded(throttle, 10)
    assert throttle.refusal_probability() == 10 / 211


def test_high_priority_is_never_refused() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, clock=Clock(), draw=lambda: 0.0)
    overloaded(throttle, 100)
    assert throttle.refusal_probability() > 0.9
    assert all(throttle.admit(refusable=False) for _ in range(100))
    assert throttle.refused == 0


def test_counts_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    throttle = AdaptiveThrottle(2.0, 10.0, clock=clock, draw=lambda: 0.0)
    overloaded(throttle, 500)
    assert throttle.refusal_probability() > 0.99
    clock.now += 9.0
    assert throttle.refusal_probability() > 0.99
    clock.now += 1.0
    assert throttle.refusal_probability() == 0.0
    assert throttle.admit()


def test_a_client_with_fewer_answers_than_the_minimum_refuses_none() -> None:
    clock = Clock()
    throttle = AdaptiveThrottle(2.0, 10.0, min_requests=50, clock=clock, draw=lambda: 0.0)
    overloaded(throttle, 49)
    assert throttle.admit()
    overloaded(throttle, 1)
    assert not throttle.admit()


def test_the_refusal_probability_is_capped() -> None:
    throttle = AdaptiveThrottle(2.0, 10.0, max_probability=0.9, clock=Clock(), draw=lambda: 0.95)
    overloaded(throttle, 1000)
    assert throttle.refusal_probability() == 0.9
    assert throttle.admit()


def test_under_overload_the_client_sends_about_k_times_what_is_accepted() -> None:
    """1,000 requests a second offered, the pipeline accepts 100 a second of those sent
    and answers the rest `overloaded`; a refused request is counted as answered."""
    clock = Clock()
    throttle = AdaptiveThrottle(2.0, 10.0, clock=clock, draw=random.Random(7).random)
    sent_per_second = []
    for _ in range(60):
        sent = accepted = 0
        for _ in range(1000):
            clock.now += 0.001
            if throttle.admit():
                sent += 1
                throttle.answered(accepted=accepted < 100)
                accepted += 1
            else:
                throttle.answered(accepted=False)
        sent_per_second.append(sent)
    steady = sent_per_second[20:]
    assert 190 <= sum(steady) / len(steady) <= 215, steady
    assert throttle.refused > 60 * 1000 * 0.7

"""The circuit breaker's states on a fake clock: closed, open, half-open and back."""

from __future__ import annotations

from agents.breaker import Breakers, BreakerState, CircuitBreaker, FailureWindow, Outcome
from tests.clock import FakeClock
from topology.settings import BreakerSettings


def breaker(clock: FakeClock, **limits: float) -> tuple[CircuitBreaker, list[BreakerState]]:
    values = {"window_s": 10.0, "min_calls": 4, "failure_rate": 0.5, "cooldown_s": 5.0, **limits}
    changes: list[BreakerState] = []
    return CircuitBreaker(BreakerSettings.model_validate(values), clock, changes.append), changes


def state(b: CircuitBreaker) -> BreakerState:
    """The breaker's state now: mypy would keep `b.state` narrowed by an earlier assert,
    though the calls since changed it."""
    return b.state


def call(b: CircuitBreaker, outcome: Outcome) -> bool:
    """One call through the breaker: whether it was let through."""
    permit = b.allow()
    if permit is None:
        return False
    b.record(permit, outcome)
    return True


def test_closed_until_enough_calls_fail_then_open() -> None:
    b, changes = breaker(FakeClock())
    for _ in range(3):
        assert call(b, Outcome.FAILURE)
    assert state(b) is BreakerState.CLOSED  # three failures, but fewer than min_calls calls
    assert call(b, Outcome.SUCCESS)
    assert state(b) is BreakerState.OPEN  # 3 of 4 failed
    assert changes == [BreakerState.OPEN]
    assert b.allow() is None


def test_it_opens_when_the_share_of_failures_reaches_the_rate() -> None:
    b, _ = breaker(FakeClock())
    for outcome in (Outcome.FAILURE, Outcome.SUCCESS, Outcome.SUCCESS, Outcome.SUCCESS):
        call(b, outcome)
    call(b, Outcome.FAILURE)
    assert state(b) is BreakerState.CLOSED  # 2 of 5
    call(b, Outcome.FAILURE)
    assert state(b) is BreakerState.OPEN  # 3 of 6


def test_a_failure_rate_below_the_threshold_keeps_it_closed() -> None:
    b, _ = breaker(FakeClock())
    for i in range(100):
        call(b, Outcome.FAILURE if i % 3 == 2 else Outcome.SUCCESS)
    assert state(b) is BreakerState.CLOSED


def test_max_failures_opens_it_whatever_the_rate() -> None:
    b, _ = breaker(FakeClock(), max_failures=3)
    for _ in range(50):
        call(b, Outcome.SUCCESS)
    for _ in range(3):
        call(b, Outcome.FAILURE)
    assert state(b) is BreakerState.OPEN


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    for _ in range(3):
        call(b, Outcome.FAILURE)
    clock.now += 11.0
    call(b, Outcome.FAILURE)
    call(b, Outcome.SUCCESS)
    call(b, Outcome.SUCCESS)
    assert state(b) is BreakerState.CLOSED  # 1 of 3 in the window


def test_abandoned_calls_do_not_count() -> None:
    b, _ = breaker(FakeClock())
    for _ in range(10):
        call(b, Outcome.ABANDONED)
    assert b.window.counts(1000.0) == (0, 0)
    assert state(b) is BreakerState.CLOSED


def trip(b: CircuitBreaker) -> None:
    for _ in range(4):
        call(b, Outcome.FAILURE)
    assert state(b) is BreakerState.OPEN


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_it() -> None:
    clock = FakeClock()
    b, changes = breaker(clock)
    trip(b)
    clock.now += 4.9
    assert b.allow() is None
    clock.now += 0.1
    assert state(b) is BreakerState.HALF_OPEN
    probe = b.allow()
    assert probe is not None and probe.probe
    assert b.allow() is None  # one probe at a time
    b.record(probe, Outcome.SUCCESS)
    assert state(b) is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert b.window.counts(clock.now) == (0, 0)  # a fresh window once closed


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    trip(b)
    clock.now += 5.0
    probe = b.allow()
    assert probe is not None
    b.record(probe, Outcome.FAILURE)
    assert state(b) is BreakerState.OPEN
    clock.now += 4.0
    assert b.allow() is None
    clock.now += 1.0
    assert state(b) is BreakerState.HALF_OPEN


def test_an_abandoned_probe_frees_its_slot_and_leaves_it_half_open() -> None:
    clock = FakeClock()
    b, _ = breaker(clock, half_open_probes=2)
    trip(b)
    clock.now += 5.0
    first, second = b.allow(), b.allow()
    assert first is not None and second is not None and b.allow() is None
    b.record(first, Outcome.ABANDONED)
    assert state(b) is BreakerState.HALF_OPEN
    assert b.would_allow()


def test_calls_let_through_before_it_opened_do_not_close_it() -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    early = b.allow()
    assert early is not None and not early.probe
    trip(b)
    clock.now += 5.0
    assert state(b) is BreakerState.HALF_OPEN
    b.record(early, Outcome.SUCCESS)
    assert state(b) is BreakerState.HALF_OPEN


def test_the_window_keeps_a_fixed_number_of_buckets() -> None:
    window = FailureWindow(window_s=10.0)
    for second in range(1000):
        window.add(failed=second % 2 == 0, now=float(second))
    assert len(window.buckets) == 10
    assert window.counts(999.0) == (10, 5)


def test_breakers_are_per_deployment_and_report_their_model() -> None:
    clock = FakeClock()
    changes: list[tuple[str, BreakerState]] = []
    settings = BreakerSettings(min_calls=2, failure_rate=0.5)
    breakers = Breakers(settings, clock, lambda model, state: changes.append((model, state)))
    for _ in range(2):
        call(breakers.of("a"), Outcome.FAILURE)
        call(breakers.of("b"), Outcome.SUCCESS)
    assert state(breakers.of("a")) is BreakerState.OPEN
    assert state(breakers.of("b")) is BreakerState.CLOSED
    assert changes == [("a", BreakerState.OPEN)]

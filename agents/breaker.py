"""Circuit breakers, one per deployment: stop calling a model that keeps failing, and find
out when it is back by letting a few probe calls through.

The states are the usual three (closed, open, half-open; Nygard's "Release It!"). The
failure rate is counted over a sliding time window kept in fixed buckets, so memory stays
bounded however many calls go through. Time comes from a clock passed in, so the state
machine is tested without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from topology.settings import BreakerSettings

WINDOW_BUCKETS = 10


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    ABANDONED = "abandoned"
    """The call ended without saying anything of the deployment's health: cancelled
    because its request ran out of time, or refused as a request the model cannot take."""


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; a probe is one of the few calls a half-open breaker lets
    through, and only a probe's outcome decides whether the breaker closes."""

    probe: bool


@dataclass
class Bucket:
    slot: int
    calls: int = 0
    failures: int = 0


class FailureWindow:
    """Calls and failures over the last `window_s`, in `WINDOW_BUCKETS` buckets; slot n
    holds the calls between n and n + 1 bucket widths since the clock's zero."""

    def __init__(self, window_s: float) -> None:
        self.width = window_s / WINDOW_BUCKETS
        self.buckets = [Bucket(slot=-1) for _ in range(WINDOW_BUCKETS)]

    def add(self, failed: bool, now: float) -> None:
        slot = math.floor(now / self.width)
        bucket = self.buckets[slot % WINDOW_BUCKETS]
        if bucket.slot != slot:
            bucket.slot, bucket.calls, bucket.failures = slot, 0, 0
        bucket.calls += 1
        bucket.failures += failed

    def counts(self, now: float) -> tuple[int, int]:
        """Calls and failures in the window that ends now."""
        current = math.floor(now / self.width)
        live = [b for b in self.buckets if current - b.slot < WINDOW_BUCKETS]
        return sum(b.calls for b in live), sum(b.failures for b in live)

    def clear(self) -> None:
        for bucket in self.buckets:
            bucket.slot, bucket.calls, bucket.failures = -1, 0, 0


class CircuitBreaker:
    """The breaker of one deployment. Every `allow()` that returns a permit must be
    followed by one `record()` of the call's outcome."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.window = FailureWindow(settings.window_s)
        self._state = BreakerState.CLOSED
        self.opened_at = 0.0
        self.probes_out = 0

    @property
    def state(self) -> BreakerState:
        """Open turns half-open once the cooldown has passed."""
        cooled = self.clock() - self.opened_at >= self.settings.cooldown_s
        if self._state is BreakerState.OPEN and cooled:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def would_allow(self) -> bool:
        """Whether `allow()` would give a permit now."""
        state = self.state
        probe_free = self.probes_out < self.settings.half_open_probes
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and probe_free)

    def allow(self) -> Permit | None:
        """A permit to call, or None while open or while every probe is out."""
        if not self.would_allow():
            return None
        probe = self._state is BreakerState.HALF_OPEN
        self.probes_out += probe
        return Permit(probe=probe)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        if permit.probe:
            self.probes_out -= 1
            if outcome is Outcome.SUCCESS:
                self._move(BreakerState.CLOSED)
            elif outcome is Outcome.FAILURE:
                self._open()
            return
        if outcome is Outcome.ABANDONED:
            return
        now = self.clock()
        self.window.add(outcome is Outcome.FAILURE, now)
        if self._state is BreakerState.CLOSED and self._tripped(now):
            self._open()

    def _tripped(self, now: float) -> bool:
        calls, failures = self.window.counts(now)
        limits = self.settings
        if limits.max_failures is not None and failures >= limits.max_failures:
            return True
        return calls >= limits.min_calls and failures >= limits.failure_rate * calls

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        """A breaker that opens or closes starts a fresh window: the calls before say
        nothing of the deployment after the cooldown."""
        if state is not BreakerState.HALF_OPEN:
            self.window.clear()
        if state is self._state:
            return
        self._state = state
        if self.on_change is not None:
            self.on_change(state)


class Breakers:
    """One breaker per deployment, made when the deployment is first called."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.by_model: dict[str, CircuitBreaker] = {}

    def of(self, model: str) -> CircuitBreaker:
        breaker = self.by_model.get(model)
        if breaker is None:
            notify = self.on_change
            breaker = self.by_model[model] = CircuitBreaker(
                self.settings,
                self.clock,
                None if notify is None else lambda state: notify(model, state),
            )
        return breaker

"""A clock the test sets by hand, for logic that takes a `Callable[[], float]` clock."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

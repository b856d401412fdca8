"""The cancelled set: bounded in time and count, listeners told of each cancel."""

from __future__ import annotations

from schemas.messages import CancelEvent
from streams.cancel import CancelledSet


def test_a_cancelled_id_is_known_with_its_reason() -> None:
    cancelled = CancelledSet(remember_s=60.0, max_entries=10)
    cancelled.add(CancelEvent(request_id="a", reason="user left"), now=100.0)
    assert "a" in cancelled and "b" not in cancelled
    assert cancelled.reason("a") == "user left"
    assert cancelled.reason("b") is None


def test_cancels_are_forgotten_after_remember_s() -> None:
    cancelled = CancelledSet(remember_s=60.0, max_entries=10)
    cancelled.add(CancelEvent(request_id="old"), now=100.0)
    cancelled.add(CancelEvent(request_id="new"), now=161.0)
    assert "old" not in cancelled and "new" in cancelled


def test_at_most_max_entries_are_kept_oldest_first_out() -> None:
    cancelled = CancelledSet(remember_s=60.0, max_entries=2)
    for index, request_id in enumerate("abc"):
        cancelled.add(CancelEvent(request_id=request_id), now=100.0 + index)
    assert len(cancelled) == 2 and "a" not in cancelled


def test_listeners_hear_of_each_cancel() -> None:
    heard: list[str] = []
    cancelled = CancelledSet(remember_s=60.0, max_entries=10)
    cancelled.listen(lambda event: heard.append(event.request_id))
    cancelled.add(CancelEvent(request_id="a"), now=1.0)
    assert heard == ["a"]

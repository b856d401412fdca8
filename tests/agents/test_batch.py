"""BatchWindows: close when full, close when due, per-model windows, bounded queue."""

from __future__ import annotations

import pytest

from agents.batch import BatchWindows, QueueFull


def windows(
    max_size: int = 3, max_wait_s: float = 0.01, max_queued: int = 100
) -> BatchWindows[str]:
    return BatchWindows(max_size=max_size, max_wait_s=max_wait_s, max_queued=max_queued)


def test_closes_when_full_and_returns_the_items() -> None:
    w = windows(max_size=3)
    assert w.add("m", "a", now=0.0) is None
    assert w.add("m", "b", now=0.001) is None
    assert w.add("m", "c", now=0.002) == ["a", "b", "c"]
    assert w.windows == {}
    assert w.queued == 0
    assert w.next_due() is None


def test_max_size_one_closes_at_once() -> None:
    w = windows(max_size=1)
    assert w.add("m", "a", now=0.0) == ["a"]
    assert w.queued == 0


def test_due_after_max_wait() -> None:
    w = windows(max_wait_s=0.25)
    w.add("m", "a", now=1.0)
    w.add("m", "b", now=1.125)
    assert w.due(now=1.2) == []
    assert w.queued == 2
    assert w.due(now=1.25) == [("m", ["a", "b"])]
    assert w.queued == 0
    assert w.due(now=5.0) == []


def test_models_get_separate_windows() -> None:
    w = windows(max_size=2, max_wait_s=0.25)
    assert w.add("small", "s1", now=0.0) is None
    assert w.add("large", "l1", now=0.5) is None
    assert w.queued == 2
    assert w.add("small", "s2", now=0.625) == ["s1", "s2"]
    assert list(w.windows) == ["large"]
    assert w.due(now=0.7) == []
    assert w.due(now=0.75) == [("large", ["l1"])]


def test_due_returns_only_expired_windows() -> None:
    w = windows(max_wait_s=0.25)
    w.add("a", "1", now=0.0)
    w.add("b", "2", now=0.125)
    assert w.due(now=0.25) == [("a", ["1"])]
    assert list(w.windows) == ["b"]


def test_next_due_is_the_earliest_window_deadline() -> None:
    w = windows(max_wait_s=0.5)
    assert w.next_due() is None
    w.add("late", "x", now=2.0)
    w.add("early", "y", now=1.0)
    assert w.next_due() == pytest.approx(1.5)
    w.due(now=1.6)
    assert w.next_due() == pytest.approx(2.5)


def test_a_new_window_opens_after_one_closes() -> None:
    w = windows(max_size=2, max_wait_s=1.0)
    w.add("m", "a", now=0.0)
    w.add("m", "b", now=0.1)
    w.add("m", "c", now=5.0)
    assert w.next_due() == pytest.approx(6.0)


def test_queue_full_at_max_queued_across_models() -> None:
    w = windows(max_size=10, max_queued=3)
    w.add("a", "1", now=0.0)
    w.add("b", "2", now=0.0)
    w.add("a", "3", now=0.0)
    with pytest.raises(QueueFull):
        w.add("c", "4", now=0.0)
    assert w.queued == 3
    assert "c" not in w.windows
    w.due(now=1.0)
    assert w.add("c", "4", now=1.0) is None
    assert w.queued == 1


def test_dispatched_requests_count_against_the_bound_until_they_finish() -> None:
    w = windows(max_size=2, max_queued=3)
    batch = w.add("m", "a", now=0.0)
    assert batch is None
    batch = w.add("m", "b", now=0.0)
    assert batch == ["a", "b"]
    w.in_flight += len(batch)
    w.add("m", "c", now=0.0)
    with pytest.raises(QueueFull):
        w.add("m", "d", now=0.0)
    w.in_flight -= 2
    assert w.queued == 1
    w.add("m", "d", now=0.0)

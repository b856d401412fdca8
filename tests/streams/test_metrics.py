"""RecentShare: the rate over the last N outcomes that the cache and merge gauges show."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

from streams.metrics import RecentShare


def share(size: int) -> tuple[RecentShare, CollectorRegistry]:
    registry = CollectorRegistry()
    gauge = Gauge("recent_share_test", "a test gauge", registry=registry)
    return RecentShare(gauge, size), registry


def test_the_share_is_of_the_outcomes_seen_so_far() -> None:
    recent, registry = share(4)
    assert recent.add(True) == 1.0
    assert recent.add(False) == 0.5
    assert registry.get_sample_value("recent_share_test") == 0.5


def test_old_outcomes_fall_out_of_the_window() -> None:
    recent, _ = share(3)
    for outcome in (True, True, True, False, False):
        last = recent.add(outcome)
    assert last == pytest.approx(1 / 3)
    assert recent.add(False) == 0.0
    assert recent.add(True) == pytest.approx(1 / 3)

import time

from streams.backlog import HopBacklog


def test_no_hop_seen_means_nothing_queues() -> None:
    assert HopBacklog(limit_ms=10.0).level_ms(100.0) == 0.0


def test_the_level_is_the_median_hop_of_the_window() -> None:
    backlog = HopBacklog(limit_ms=10.0, window_s=1.0)
    for waited in (5.0, 200.0, 300.0):
        backlog.observe(waited, 100.0)
    assert backlog.level_ms(100.5) == 200.0


def test_hops_older_than_the_window_no_longer_count() -> None:
    """Intake held on an old backlog would wait forever once nothing flows."""
    backlog = HopBacklog(limit_ms=10.0, window_s=1.0)
    backlog.observe(500.0, 100.0)
    backlog.observe(2.0, 100.8)
    assert backlog.level_ms(100.9) == 251.0
    assert backlog.level_ms(101.5) == 2.0
    assert backlog.level_ms(102.0) == 0.0


async def test_intake_waits_until_the_slow_hops_leave_the_window() -> None:
    backlog = HopBacklog(limit_ms=10.0, window_s=0.05)
    assert not await backlog.wait_until_below()
    backlog.observe(100.0, time.time())
    started = time.monotonic()
    assert await backlog.wait_until_below()
    assert time.monotonic() - started >= 0.04

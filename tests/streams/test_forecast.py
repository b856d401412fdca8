"""The forecaster: per-minute counts from offsets, Holt's forecast, replicas and clamps."""

from __future__ import annotations

import pytest

from streams.forecast import (
    ArrivalForecaster,
    MinuteCounts,
    group_partitions,
    holt,
    useful_replicas,
)
from topology.settings import DEPLOY_GROUPS, ScalerGroup, ScalerSettings, Settings, TopicSpec

START = 600_000.0  # the start of a minute


def scaler(capacity: float = 10.0, minimum: int = 1, lookahead_s: float = 120.0) -> ScalerSettings:
    group = ScalerGroup(capacity_rps=capacity, min_replicas=minimum)
    return ScalerSettings(lookahead_s=lookahead_s, groups={"infer": group})


def feed(forecaster: ArrivalForecaster, per_minute: list[int], every_s: float = 15.0) -> None:
    """Samples of the summed end offset every `every_s` from the start of a minute, while
    each minute's arrivals come evenly."""
    total = 0
    forecaster.observe(START, total)
    steps = round(60 / every_s)
    for minute, count in enumerate(per_minute):
        for step in range(1, steps + 1):
            total_at = total + count * step // steps
            forecaster.observe(START + minute * 60 + step * every_s, total_at)
        total += count


def test_minute_counts_from_offsets_whatever_the_interval() -> None:
    counts = MinuteCounts(keep=10)
    counts.add(START + 10, 100)  # first sample: a baseline, its minute partly unseen
    counts.add(START + 70, 160)  # 60 over 60 s: 50 in the first minute, 10 in the second
    counts.add(START + 190, 400)  # 240 over 120 s: 100 in the second, 120, then 20
    assert list(counts.closed) == [pytest.approx(110.0), pytest.approx(120.0)]


def test_a_missed_sample_spreads_its_arrivals_and_falling_offsets_count_nothing() -> None:
    counts = MinuteCounts(keep=10)
    counts.add(START, 0)
    counts.add(START + 180, 300)  # three minutes in one gap
    counts.add(START + 240, 10)  # the topic was recreated
    counts.add(START + 300, 70)
    assert list(counts.closed) == [100.0, 100.0, 100.0, 0.0, 60.0]


def test_history_is_bounded() -> None:
    counts = MinuteCounts(keep=3)
    counts.add(START, 0)
    for minute in range(1, 11):
        counts.add(START + minute * 60, minute * 60)
    assert len(counts.closed) == 3


def test_holt_follows_a_line_and_a_constant() -> None:
    assert holt([10.0, 20.0, 30.0, 40.0], alpha=0.5, beta=0.3) == pytest.approx((40.0, 10.0))
    assert holt([7.0] * 5, alpha=0.5, beta=0.3) == pytest.approx((7.0, 0.0))
    assert holt([], 0.5, 0.3) == (0.0, 0.0)


def test_a_rising_ramp_raises_replicas_before_the_current_rate_does() -> None:
    """Arrivals grow by 60 a minute (1 req/s more each minute). One replica serves 10 req/s;
    the current rate asks for a second replica only once a minute has brought more than 600,
    the forecast, looking a pod start-up (2 min) past the running minute, sooner."""
    ramp = [60 * (minute + 1) for minute in range(20)]
    by_forecast = by_current = None
    for minute in range(1, len(ramp) + 1):
        forecaster = ArrivalForecaster(scaler(capacity=10.0), {"infer": 8})
        feed(forecaster, ramp[:minute])
        if by_forecast is None and forecaster.replicas(forecaster.forecast_rate())["infer"] > 1:
            by_forecast = minute
        if by_current is None and forecaster.replicas(forecaster.current_rate())["infer"] > 1:
            by_current = minute
    assert forecaster.current_rate() == pytest.approx(20.0)
    # Three minutes past the last one (the running minute and two of start-up): 23 req/s.
    assert forecaster.forecast_rate() == pytest.approx(23.0, rel=0.02)
    # Three minutes sooner: the running minute and the two a new pod takes to start.
    assert (by_forecast, by_current) == (8, 11)


def test_a_steady_rate_asks_for_what_it_needs_and_no_more() -> None:
    forecaster = ArrivalForecaster(scaler(capacity=10.0), {"infer": 8})
    feed(forecaster, [1500] * 10)  # 25 req/s
    assert forecaster.forecast_rate() == pytest.approx(25.0)
    assert forecaster.replicas(forecaster.forecast_rate()) == {"infer": 3}


def test_replicas_are_clamped_to_min_and_partitions() -> None:
    forecaster = ArrivalForecaster(scaler(capacity=10.0, minimum=2), {"infer": 4})
    assert forecaster.replicas(0.0) == {"infer": 2}
    assert forecaster.replicas(35.0) == {"infer": 4}
    assert forecaster.replicas(1000.0) == {"infer": 4}
    # A minimum above the partitions would only add idle pods.
    tight = ArrivalForecaster(scaler(capacity=10.0, minimum=6), {"infer": 4})
    assert tight.replicas(0.0) == {"infer": 4}


def test_replicas_are_rounded_up_to_counts_that_spread_the_partitions() -> None:
    # With 4 partitions the busiest of 3 replicas holds 2, as with 2: 3 would add nothing.
    assert [useful_replicas(needed, 4) for needed in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0)] == [
        1,
        1,
        2,
        2,
        4,
        4,
        4,
    ]
    # With 12 partitions 5 replicas hold 3 at most, as 4 do; 6 hold 2.
    assert [useful_replicas(needed, 12) for needed in (3.5, 4.5, 5.0, 6.5)] == [4, 6, 6, 12]
    forecaster = ArrivalForecaster(scaler(capacity=10.0), {"infer": 4})
    assert forecaster.replicas(25.0) == {"infer": 4}


def test_a_falling_rate_never_forecasts_below_zero() -> None:
    forecaster = ArrivalForecaster(scaler(capacity=10.0, minimum=0), {"infer": 4})
    feed(forecaster, [600, 300, 60, 0, 0])
    assert forecaster.forecast_rate() == 0.0
    assert forecaster.replicas(forecaster.forecast_rate()) == {"infer": 0}


def test_no_history_means_no_rate() -> None:
    forecaster = ArrivalForecaster(scaler(), {"infer": 4})
    forecaster.observe(START, 0)
    assert forecaster.current_rate() == 0.0
    assert forecaster.forecast_rate() == 0.0


def test_group_partitions_follow_the_topology() -> None:
    settings = Settings()
    assert group_partitions(settings) == {group: 4 for group in DEPLOY_GROUPS}
    requests = TopicSpec(name="llm.requests", partitions=12)
    batch = settings.stage("batch").model_copy(
        update={"topic": TopicSpec(name="llm.stage.batch", partitions=6)}
    )
    stages = [batch if s.name == "batch" else s for s in settings.stages]
    wider = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"requests": requests}),
            "stages": stages,
        }
    )
    counts = group_partitions(wider)
    assert (counts["edge"], counts["infer"], counts["core"]) == (12, 6, 4)


def test_default_groups_cover_every_deploy_group() -> None:
    groups = Settings().scaler.groups
    assert set(groups) == set(DEPLOY_GROUPS)
    assert all(spec.min_replicas >= 1 for spec in groups.values())
    with pytest.raises(ValueError, match="unknown deploy groups"):
        Settings(scaler=ScalerSettings(groups={"gpu": ScalerGroup(capacity_rps=1.0)}))

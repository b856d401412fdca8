"""Predictive scaling: forecast the request rate and the replicas each deploy group needs.

Lag-based autoscaling reacts after a backlog has formed, and a new pod then takes minutes
to start and join the consumer group. `llmflow scaler` instead counts arrivals per minute
from the requests topic's end offsets, forecasts the rate one pod start-up ahead with
Holt's double exponential smoothing (level and trend), and exports the replicas that rate
needs as `llmflow_predicted_replicas{group}`, which an HPA or KEDA follows.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams import metrics
from topology.settings import DEPLOY_GROUPS, ENTRY_STAGE, ScalerSettings, Settings

MINUTE_S = 60.0


class MinuteCounts:
    """Arrivals per whole minute from samples of a topic's summed end offsets.

    What arrived between two samples is spread evenly over the time between them, so a
    sample interval that does not divide a minute, or a missed sample, still gives each
    minute its share. The minute of the first sample is dropped when the sample came
    after its start: part of it went unseen.
    """

    def __init__(self, keep: int) -> None:
        self.closed: deque[float] = deque(maxlen=keep)
        self._last: tuple[float, int] | None = None
        self._minute = 0
        self._open = 0.0
        self._first_partial = False

    def add(self, now_s: float, total: int) -> None:
        if self._last is None:
            self._last = (now_s, total)
            self._minute = int(now_s // MINUTE_S)
            self._first_partial = now_s % MINUTE_S != 0
            return
        then, before = self._last
        if now_s <= then:
            return
        self._last = (now_s, total)
        # Offsets only fall when the topic was recreated; count nothing then.
        arrived = max(0, total - before)
        at = then
        while at < now_s:
            minute = int(at // MINUTE_S)
            end = min(now_s, (minute + 1) * MINUTE_S)
            self._credit(minute, arrived * (end - at) / (now_s - then))
            at = end
        self._credit(int(now_s // MINUTE_S), 0.0)  # a minute is whole once it has passed

    def _credit(self, minute: int, arrived: float) -> None:
        while self._minute < minute:
            if not self._first_partial:
                self.closed.append(self._open)
            self._first_partial = False
            self._open = 0.0
            self._minute += 1
        self._open += arrived


def holt(series: list[float], alpha: float, beta: float) -> tuple[float, float]:
    """Level and trend (per step) of `series` by Holt's linear exponential smoothing."""
    if not series:
        return 0.0, 0.0
    level = series[0]
    trend = series[1] - series[0] if len(series) > 1 else 0.0
    for value in series[1:]:
        previous = level
        level = alpha * value + (1 - alpha) * (level + trend)
        trend = beta * (level - previous) + (1 - beta) * trend
    return level, trend


class ArrivalForecaster:
    """Arrivals per minute in, the forecast rate and each group's replicas out.

    `max_replicas` is each group's partition count: replicas past it get no partition and
    sit idle, so the plan never asks for them.
    """

    def __init__(self, scaler: ScalerSettings, max_replicas: dict[str, int]) -> None:
        self.scaler = scaler
        self.max_replicas = max_replicas
        self.counts = MinuteCounts(scaler.history_minutes)

    def observe(self, now_s: float, total: int) -> None:
        self.counts.add(now_s, total)

    def current_rate(self) -> float:
        """Requests a second over the last whole minute."""
        return self.counts.closed[-1] / MINUTE_S if self.counts.closed else 0.0

    def forecast_rate(self) -> float:
        """Requests a second expected one pod start-up after the minute now running."""
        level, trend = holt(list(self.counts.closed), self.scaler.alpha, self.scaler.beta)
        ahead = 1 + self.scaler.lookahead_s / MINUTE_S
        return max(0.0, level + ahead * trend) / MINUTE_S

    def replicas(self, rate: float) -> dict[str, int]:
        """Replicas each group needs to serve `rate`, within [min_replicas, partitions]."""
        plan = {}
        for group, spec in self.scaler.groups.items():
            top = self.max_replicas[group]
            wanted = useful_replicas(rate / spec.capacity_rps, top)
            plan[group] = max(min(spec.min_replicas, top), wanted)
        return plan


def useful_replicas(needed: float, partitions: int) -> int:
    """The fewest replicas that serve `needed` replicas' worth of load, counting that the
    busiest holds ceil(partitions / replicas) partitions: with 4 partitions a third replica
    leaves two of them holding two each, as two replicas do, so 3 is never asked for."""
    if needed <= 0:
        return 0
    for replicas in range(1, partitions + 1):
        busiest = math.ceil(partitions / replicas)
        if partitions / busiest >= needed:
            return math.ceil(partitions / busiest)
    return partitions


def group_partitions(settings: Settings) -> dict[str, int]:
    """Each deploy group's useful replicas: the most partitions of any topic it reads."""
    counts = {}
    for group, stages in DEPLOY_GROUPS.items():
        topics = [
            settings.topics.requests if stage == ENTRY_STAGE else settings.stage(stage).topic
            for stage in stages
        ]
        counts[group] = max(topic.partitions for topic in topics)
    return counts


class RequestOffsets:
    """The requests topic's end offsets summed over its partitions (as many as the
    topology gives it): every request ever published to it, whatever was consumed."""

    def __init__(self, settings: Settings) -> None:
        spec = settings.topics.requests
        self.partitions = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
        )

    async def start(self) -> None:
        await self.consumer.start()

    async def total(self) -> int:
        ends = await self.consumer.end_offsets(self.partitions)
        return sum(ends.values())

    async def stop(self) -> None:
        await self.consumer.stop()


async def run_scaler(settings: Settings, rounds: int | None = None) -> ArrivalForecaster:
    """Sample every `scaler.interval_s` and export the forecast; `rounds` bounds the loop."""
    forecaster = ArrivalForecaster(settings.scaler, group_partitions(settings))
    offsets = RequestOffsets(settings)
    await offsets.start()
    try:
        done = 0
        while rounds is None or done < rounds:
            forecaster.observe(time.time(), await offsets.total())
            rate = forecaster.forecast_rate()
            metrics.forecast_arrival_rate.set(rate)
            for group, count in forecaster.replicas(rate).items():
                metrics.predicted_replicas.labels(group).set(count)
            done += 1
            if rounds is None or done < rounds:
                await asyncio.sleep(settings.scaler.interval_s)
    finally:
        await offsets.stop()
    return forecaster

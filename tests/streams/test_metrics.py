"""The pure pieces of the workers' metrics: recent shares, routing outcomes, parallel
efficiency, overhead, resource shares and consumer lag."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from faust.types import TP
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from llmflow.client import new_request
from schemas.messages import Envelope, Result, Status, Usage
from streams.metrics import (
    Efficiency,
    RecentShare,
    ResourceUse,
    WorkerSampler,
    batch_processing,
    cores_available,
    count_routing_outcome,
    count_usage,
    efficiency,
    in_upstream,
    memory_available,
    overhead_seconds,
    partition_lag,
    routing_outcome,
    upstream_call,
)


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


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_answer_that_did_not_stand_was_escalated_if_answered_else_failed() -> None:
    assert routing_outcome(stood=True, answered=True) == "stood"
    assert routing_outcome(stood=False, answered=True) == "escalated"
    assert routing_outcome(stood=False, answered=False) == "failed"


def test_routing_outcomes_count_and_set_the_models_recent_accuracy() -> None:
    before = sample("llmflow_routing_outcomes_total", model="acc-test", outcome="escalated")
    for stood, answered in ((True, True), (True, True), (True, True), (False, True)):
        count_routing_outcome("acc-test", stood, answered)
    after = sample("llmflow_routing_outcomes_total", model="acc-test", outcome="escalated")
    assert after - before == 1
    assert sample("llmflow_model_routing_accuracy", model="acc-test") == 0.75


def test_efficiency_is_call_time_over_batch_time_per_interval() -> None:
    efficiency = Efficiency()
    assert efficiency.sample() is None
    efficiency.capacity += 4 * 0.5  # a batch of 4 took 0.5 s
    efficiency.busy += 0.5 + 0.5 + 0.25 + 0.25  # two of its calls were twice as fast
    assert efficiency.sample() == 0.75
    assert efficiency.sample() is None  # a new interval without batches
    efficiency.capacity += 1.0
    efficiency.busy += 3.0  # an ensemble's samples overlap: capped
    assert efficiency.sample() == 1.0


def test_a_batch_and_its_calls_feed_the_latency_histograms_and_the_efficiency() -> None:
    efficiency.sample()
    batches = sample("llmflow_batch_processing_latency_seconds_count", model="eff-test")
    calls = sample("llmflow_upstream_latency_seconds_count", model="eff-test")
    with batch_processing("eff-test", 2):
        with upstream_call("eff-test"):
            assert sample("llmflow_requests_in_flight") >= 1
            time.sleep(0.01)
        with pytest.raises(TimeoutError), upstream_call("eff-test"):
            raise TimeoutError
    assert sample("llmflow_batch_processing_latency_seconds_count", model="eff-test") == batches + 1
    assert sample("llmflow_upstream_latency_seconds_count", model="eff-test") == calls + 1
    ratio = efficiency.sample()
    assert ratio is not None and 0.0 < ratio <= 0.5


def test_a_sample_between_a_batch_s_calls_and_its_end_leaves_them_together() -> None:
    efficiency.sample()
    with batch_processing("eff-test", 1):
        with upstream_call("eff-test"):
            time.sleep(0.01)
        assert efficiency.sample() is None  # the sampler's timer fires here
    ratio = efficiency.sample()
    assert ratio is not None and ratio > 0.5


def test_usage_counts_tokens_by_kind_and_spend_by_tenant() -> None:
    before = sample("llmflow_spend_usd_total", model="use-test", tenant="acme")
    count_usage(
        "use-test", "acme", Result(usage=Usage(prompt_tokens=7, completion_tokens=3), cost_usd=0.25)
    )
    assert sample("llmflow_tokens_total", model="use-test", kind="prompt") >= 7
    assert sample("llmflow_tokens_total", model="use-test", kind="completion") >= 3
    assert sample("llmflow_spend_usd_total", model="use-test", tenant="acme") - before == 0.25


def envelope(status: Status | None = None, upstream_ms: float = 0.0) -> Envelope:
    return Envelope(request=new_request("hi", "acme"), status=status, upstream_ms=upstream_ms)


def test_overhead_is_latency_less_the_time_in_model_calls() -> None:
    assert overhead_seconds(envelope(Status.OK, upstream_ms=300.0), 0.5) == pytest.approx(0.2)
    assert overhead_seconds(envelope(Status.CACHED), 0.05) == pytest.approx(0.05)
    assert overhead_seconds(envelope(Status.MERGED, upstream_ms=0.0), 0.9) is None


def test_time_in_upstream_accumulates_on_the_envelope() -> None:
    answered = envelope()
    for _ in range(2):
        with in_upstream(answered):
            time.sleep(0.005)
    assert answered.upstream_ms >= 10.0


def test_resource_use_is_cpu_per_second_over_cores_and_rss_over_memory() -> None:
    cpu, wall = iter([10.0, 13.0]), iter([100.0, 102.0])
    use = ResourceUse(4.0, 1000.0, lambda: next(cpu), lambda: 250.0, lambda: next(wall))
    assert use.sample() == {"cpu": pytest.approx(3.0 / 2.0 / 4.0), "memory": 0.25}


def test_cgroup_limits_win_over_the_machines_and_max_means_none(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text("1048576\n")
    assert cores_available(tmp_path) == 1.5
    assert memory_available(tmp_path) == 1048576.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert cores_available(tmp_path) == len(os.sched_getaffinity(0))
    assert memory_available(tmp_path) > 1048576.0


def test_lag_is_of_assigned_partitions_with_both_offsets() -> None:
    a, b, changelog, gone = TP("t", 0), TP("t", 1), TP("t-changelog", 0), TP("t", 2)
    end = {a: 120, b: 50, changelog: 9, gone: 7}
    committed = {a: 100, b: 50, gone: 1}
    assert partition_lag({a, b, changelog}, end, committed) == {a: 20, b: 0}


def test_the_sampler_sets_gauges_and_drops_partitions_no_longer_assigned() -> None:
    cpu, wall = iter([0.0, 1.0, 2.0]), iter([0.0, 2.0, 4.0])
    sampler = WorkerSampler(
        ResourceUse(1.0, 100.0, lambda: next(cpu), lambda: 10.0, lambda: next(wall))
    )
    a, b = TP("lag-test", 0), TP("lag-test", 1)
    sampler.sample({a, b}, {a: 10, b: 5}, {a: 4, b: 5})
    assert sample("llmflow_consumer_lag", topic="lag-test", partition="0") == 6
    assert sample("llmflow_resource_utilization_rate", resource="cpu") == 0.5
    assert sample("llmflow_resource_utilization_rate", resource="memory") == 0.1
    sampler.sample({b}, {a: 10, b: 8}, {a: 4, b: 5})
    assert (
        REGISTRY.get_sample_value("llmflow_consumer_lag", {"topic": "lag-test", "partition": "0"})
        is None
    )
    assert sample("llmflow_consumer_lag", topic="lag-test", partition="1") == 3

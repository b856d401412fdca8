"""The overload bench's pure parts: outcomes, the limits it sets, memory trend, shedding."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, start_http_server

from bench.load import OUTSIDE_STAGES, LoadRun, Outcome, Sample, WorkItem
from bench.overload import (
    MemoryTrend,
    limited,
    plot,
    preprocess_events,
    shedding,
    unlimited,
)
from llmflow.client import CLIENT_THROTTLED
from topology.settings import Settings


def sample(index: int, status: str, latency_s: float | None) -> Sample:
    item = WorkItem(f"r{index}", "t", [{"role": "user", "content": "q"}], 8, "unique")
    answered = None if latency_s is None else 100.0 + index + latency_s
    return Sample(item, 100.0 + index, answered, Outcome(status))


def test_limits_follow_the_sustainable_rate() -> None:
    settings = limited(
        Settings(),
        sustainable_rps=50.0,
        share=0.8,
        max_queued=32,
        shed_queued_ms=100.0,
        intake_pause_backlog_ms=20.0,
    )
    quota = settings.ratelimit.for_tenant("anyone")
    assert quota.tenant.requests is not None
    assert (quota.tenant.requests.per_second, quota.tenant.requests.burst) == (40.0, 40.0)
    assert quota.user.requests is None and quota.reserve == 0.0
    assert settings.batch.max_queued == 32
    assert settings.limits.shed_queued_ms == 100.0
    assert settings.limits.intake_pause_backlog_ms == 20.0
    free_settings = unlimited(Settings())
    free = free_settings.ratelimit.for_tenant("anyone").tenant.requests
    assert free is not None and free.per_second >= 1e9
    assert free_settings.limits.shed_queued_ms is None


def test_memory_trend_fits_a_line_through_the_samples() -> None:
    rising = MemoryTrend.of([(0.0, 100.0), (30.0, 110.0), (60.0, 120.0)])
    assert rising == MemoryTrend(100.0, 120.0, 120.0, 20.0)
    flat = MemoryTrend.of([(0.0, 90.0), (1.0, 95.0), (2.0, 90.0)])
    assert (flat.max_mb, flat.slope_mb_per_min) == (95.0, 0.0)
    assert MemoryTrend.of([]) == MemoryTrend(0.0, 0.0, 0.0, 0.0)


def test_shedding_counts_who_refused_and_compares_admitted_latency() -> None:
    samples = [sample(i, "ok", 0.2) for i in range(99)] + [sample(99, "ok", 0.4)]
    samples += [sample(100, "error_rate_limited", 0.01), sample(101, "error_overloaded", 0.02)]
    samples += [sample(102, "error_timeout", 5.0), sample(103, "timeout_client", None)]
    refused = Outcome("error_overloaded", reason=CLIENT_THROTTLED)
    samples.append(Sample(samples[0].item, 0.0, 0.0001, refused))
    report = shedding(LoadRun(50.0, samples), unloaded_p99_ms=200.0)
    assert report["admitted"] == 100 and report["unanswered"] == 1
    assert report["shed"] == {"error_rate_limited": 1, "error_overloaded": 2, "error_timeout": 1}
    assert report["refused_by_client"] == 1
    assert report["admitted_latency_ms"]["p99"] == 200.0
    assert report["admitted_p99_over_unloaded_p99"] == 1.0
    assert shedding(LoadRun(50.0, samples), 0.0)["admitted_p99_over_unloaded_p99"] is None


def test_shedding_gives_the_admitted_requests_stage_times_only() -> None:
    item = sample(0, "ok", 0.1).item
    samples = [
        Sample(item, 0.0, 0.1, Outcome("ok", 50.0, {"batch": 4.0, "infer": 60.0})),
        Sample(item, 0.0, 0.1, Outcome("merged", None, {"batch": 8.0})),
        Sample(item, 0.0, 0.01, Outcome("error_overloaded", None, {"preprocess": 51.0})),
    ]
    stages = shedding(LoadRun(50.0, samples), 100.0)["admitted_stage_ms"]
    assert set(stages) == {"batch", "infer", OUTSIDE_STAGES}
    assert stages["batch"]["count"] == 2 and stages["batch"]["max"] == 8.0
    assert stages["infer"]["p50"] == 60.0
    assert (stages[OUTSIDE_STAGES]["p50"], stages[OUTSIDE_STAGES]["max"]) == (36.0, 92.0)


def test_preprocess_events_are_read_from_each_worker_metrics_endpoint() -> None:
    registry = CollectorRegistry()
    events = Counter("llmflow_stage_events", "", ["stage", "outcome"], registry=registry)
    events.labels("preprocess", "queued_too_long").inc(3)
    events.labels("preprocess", "accepted").inc(2)
    events.labels("route", "accepted").inc(5)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_port
        assert preprocess_events([port, port]) == {"queued_too_long": 6, "accepted": 4}
    finally:
        server.shutdown()
        server.server_close()


def test_the_plot_draws_memory_and_the_p99_of_each_stage(tmp_path: Path) -> None:
    summary = {"p50": 50.0, "p99": 80.0}
    report = {
        "unloaded": {"latency_ms": summary, "stage_ms": {"infer": summary}},
        "overload": {
            "target_rps": 1800.0,
            "admitted_latency_ms": {"p50": 90.0, "p99": 150.0},
            "admitted_stage_ms": {"infer": summary, "only_loaded": summary},
            "admitted_p99_over_unloaded_p99": 1.88,
        },
        "worker_rss_mb": {"slope_mb_per_min": 3.0},
        "rss_mb_over_time": [[0.0, 140.0], [0.5, 141.0]],
    }
    target = tmp_path / "overload.png"
    plot(report, target)
    assert target.read_bytes().startswith(b"\x89PNG")

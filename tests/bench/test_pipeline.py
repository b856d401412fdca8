import argparse
import os
import subprocess

import pytest

from bench.load import OUTSIDE_STAGES, LoadRun, Outcome, Sample, WorkItem
from bench.pipeline import (
    ResourceMeter,
    add_arguments,
    bench_settings,
    comparison,
    cpu_per_request,
    process_usage,
    run_summary,
    stack_processes,
    to_request,
)
from topology.settings import Settings

ITEM = WorkItem("i-1", "acme", [{"role": "user", "content": "why?"}], 16, "unique")


def test_process_usage_reads_cpu_time_and_memory_of_a_pid() -> None:
    usage = process_usage(os.getpid())
    assert usage.cpu_s > 0 and usage.rss_bytes > 10 * 2**20


async def test_resource_meter_reports_cpu_share_and_peak_rss() -> None:
    meter = ResourceMeter([os.getpid()], interval_s=0.01)
    meter.start()
    total = 0
    for i in range(3_000_000):
        total += i
    report = meter.stop()
    assert total > 0
    assert report["cpu_percent_of_one_core"] > 0
    assert report["peak_rss_mib"] > 10
    assert report["processes"][0]["pid"] == os.getpid()


def test_stack_processes_finds_this_process_and_its_children_by_role() -> None:
    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            groups = stack_processes([])
        finally:
            child.kill()
    assert groups["client"] == [os.getpid()]
    assert child.pid in groups["other"]


def test_cpu_per_request_divides_each_part_s_cpu_by_the_answers() -> None:
    samples = [Sample(ITEM, 0.0, 1.0 if i < 4 else None, Outcome("ok", 0.0, {})) for i in range(5)]
    run = LoadRun(10.0, samples)
    resources = {"workers": {"cpu_s": 0.02}, "broker": {"cpu_s": 0.01}}
    cost = cpu_per_request(resources, run)
    assert cost["cpu_ms_per_request"] == {"workers": 5.0, "broker": 2.5, "all": 7.5}
    assert cost["cpu_bound_rps"] == pytest.approx((os.cpu_count() or 1) * 1e3 / 7.5, abs=0.1)


def test_work_items_become_requests_with_their_token_limit() -> None:
    request = to_request(ITEM)
    assert (request.id, request.tenant, request.params.max_tokens) == ("i-1", "acme", 16)
    assert request.last_user_turn() == "why?"


def test_bench_settings_lift_the_limits_and_set_fusion() -> None:
    settings = bench_settings(Settings(), fusion="local", embed=True)
    assert settings.fusion == "local" and settings.embedding.enabled and settings.semantic.enabled
    limit = settings.ratelimit.default.tenant.requests
    assert limit is not None and limit.per_second >= 1e6
    assert not settings.ratelimit.adaptive.enabled
    assert bench_settings(Settings(), fusion="off", embed=False).fusion == "off"


def summary(latency_ms: float, provider_ms: float) -> dict[str, object]:
    samples = [
        Sample(ITEM, float(i), i + latency_ms / 1000, Outcome("ok", provider_ms, {"dedup": 1.0}))
        for i in range(10)
    ]
    return run_summary(LoadRun(1.0, samples))


def test_run_summary_has_the_reported_keys_and_overhead_net_of_the_provider() -> None:
    report = summary(120.0, 100.0)
    assert report["overhead_p50_ms"] == pytest.approx(20.0)
    assert report["overhead_p99_ms"] == pytest.approx(20.0)
    assert report["rate_rps"] == 1.0 and report["answered_share"] == 1.0
    assert report["stage_ms"] == {
        "dedup": {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0, "mean": 1.0, "count": 10},
        OUTSIDE_STAGES: {
            "p50": 119.0,
            "p95": 119.0,
            "p99": 119.0,
            "max": 119.0,
            "mean": 119.0,
            "count": 10,
        },
    }
    lagging = LoadRun(1.0, [], loop_lag_ms=[0.5] * 99 + [40.0])
    assert run_summary(lagging)["client_loop_lag_ms"]["max"] == 40.0


def test_comparison_prints_every_run_and_each_later_one_over_the_first() -> None:
    runs = {}
    for name, latency, sustained in (("off", 150.0, 100.0), ("key", 120.0, 150.0)):
        run = summary(latency, 100.0)
        runs[name] = {
            **run,
            "max_sustained_rps": sustained,
            "workers": {"cpu_percent_of_one_core": 50.0, "peak_rss_mib": 100.0},
            "cpu_ms_per_request": {"workers": 5.0, "all": 10.0},
            "cpu_bound_rps": 200.0,
        }
    runs["local"] = {**runs["key"], "overhead_p50_ms": 10.0}
    table, ratios = comparison(runs)
    assert ratios["key"]["overhead_p50_ms"] == pytest.approx(0.4)
    assert ratios["key"]["max_sustained_rps"] == pytest.approx(1.5)
    assert ratios["local"]["overhead_p50_ms"] == pytest.approx(0.2)
    assert "key/off" in table and "local/off" in table and "stage dedup p50 ms" in table
    assert comparison({"off": runs["off"]})[1] == {}
    long_names, _ = comparison({"llmflow": runs["off"], "faust-model": runs["key"]})
    header, *rows = long_names.splitlines()
    assert header.split()[-1] == "faust-model/llmflow"
    assert rows[0].split()[-3:] == ["50.0", "20.0", "0.400"]


def test_arguments_default_to_the_issue_rate() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--compare-fusion"])
    assert args.rate == 1000.0 and args.compare_fusion and args.json == "out/pipeline.json"
    assert args.fusion is None and parser.parse_args(["--fusion", "local"]).fusion == "local"

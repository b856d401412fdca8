"""`llmflow bench pipeline`'s measurement on a running Tansu pipeline, at a rate small
enough for a loaded machine: every request answered, the report's keys filled."""

from __future__ import annotations

import argparse

import pytest

from bench.pipeline import add_arguments, measure, search
from tests.integration.conftest import PROVIDER_LATENCY_MS, RunningPipeline

pytestmark = pytest.mark.integration


async def test_measure_reports_overhead_stages_workers_and_a_rate_search(
    tansu_pipeline: RunningPipeline,
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            *("--rate", "10", "--duration", "3", "--latency-ms", str(PROVIDER_LATENCY_MS)),
            *("--search-start", "10", "--search-max", "10", "--search-duration", "2"),
            *("--seed", "21", "--timeout-s", "120"),
        ]
    )
    pids = [p.pid for p in tansu_pipeline.workers.processes]
    report = await measure(tansu_pipeline.settings, pids, args)
    report |= await search(tansu_pipeline.settings, args)

    assert report["requests"] == 30 and report["answered_share"] == 1.0, report["statuses"]
    assert set(report["statuses"]) <= {"ok", "cached", "merged"}
    assert report["overhead_ms"]["count"] >= report["statuses"]["ok"]
    assert 0 <= report["overhead_p50_ms"] <= report["overhead_p99_ms"]
    assert report["overhead_p99_ms"] <= report["latency_ms"]["max"]
    assert {"dedup", "cache", "route", "respond"} <= set(report["stage_ms"])
    assert report["workers"]["cpu_percent_of_one_core"] > 0
    assert report["workers"]["peak_rss_mib"] > 50
    assert report["cpu_ms_per_request"]["broker"] > 0
    assert report["cpu_ms_per_request"]["workers"] > 0
    assert report["cpu_bound_rps"] > 0
    assert report["search"][0]["rate_rps"] == 10
    assert report["max_sustained_rps"] in {t["rate_rps"] for t in report["search"]} | {0.0}
    assert report["warm_up"]["requests"] == 40

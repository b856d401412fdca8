"""The demo workload and the ShareGPT prompt loader."""

from __future__ import annotations

import re
from collections import Counter

from llmflow.demo import Summary, build_workload
from llmflow.prompts import load_prompts
from schemas.messages import LLMResponse, Status


def test_prompts_are_distinct_real_first_turns() -> None:
    prompts = load_prompts(300)
    assert len(prompts) == len(set(prompts)) == 300
    assert all(0 < len(p) <= 2000 for p in prompts)


def test_workload_has_bursts_of_identical_requests_and_distinct_repeats() -> None:
    workload = build_workload(200, load_prompts(200), seed=3)
    assert len(workload.first_wave) + len(workload.second_wave) == 200
    assert len(workload.second_wave) == 40
    shapes = Counter((r.tenant, r.messages[0].content) for r in workload.first_wave)
    assert sum(n - 1 for n in shapes.values()) == 40
    assert max(shapes.values()) <= 4
    repeats = [(r.tenant, r.messages[0].content) for r in workload.second_wave]
    assert len(set(repeats)) == len(repeats)
    assert set(repeats) <= set(shapes)
    ids = [r.id for r in workload.first_wave + workload.second_wave]
    assert len(set(ids)) == 200


def test_summary_counts_statuses_and_percentiles() -> None:
    responses = [
        LLMResponse(id="a", status=Status.OK, cost_usd=0.5, stage_latency_ms={"infer": 10.0}),
        LLMResponse(id="b", status=Status.CACHED, cache_kind="exact"),
        LLMResponse(id="c", status=Status.MERGED, merged_with="a", cache_kind="exact"),
        LLMResponse(id="d", status=Status.CACHED, cache_kind="semantic"),
    ]
    summary = Summary(responses=responses, latencies_ms=[10.0, 20.0, 30.0], missing=1)
    rows = dict(re.split(r"\s{2,}", line.strip()) for line in summary.table().splitlines())
    assert rows["requests"] == "5" and rows["answered"] == "4"
    assert rows["cache hits"] == "2" and rows["merges"] == "1" and rows["model calls"] == "1"
    assert rows["exact"] == "1" and rows["semantic"] == "1"  # a merge of a hit is no hit
    assert rows["missing (no answer)"] == "1"
    assert rows["latency p50 ms"] == "20.0"
    assert rows["infer p50 ms"] == "10.0"
    assert rows["upstream cost usd"] == "0.500000"

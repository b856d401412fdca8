import asyncio
import gc
import time
from collections import Counter

import pytest

from bench.load import (
    NEAR_DUPLICATE_PHRASES,
    OUTSIDE_STAGES,
    LoadRun,
    Outcome,
    Sample,
    SustainCriteria,
    WorkItem,
    WorkloadSpec,
    build_workload,
    max_sustained_rate,
    open_loop,
    outcome_of,
    percentile,
    summary_ms,
)
from schemas.messages import ErrorCode, ErrorInfo, LLMResponse, Status

PROMPTS = [f"question number {i}: why is the sky blue?" for i in range(50)]


def test_workload_mixes_duplicates_and_near_duplicates_of_earlier_items() -> None:
    items = build_workload(
        WorkloadSpec(count=2000, duplicate_share=0.2, near_duplicate_share=0.3, seed=7), PROMPTS
    )
    kinds = Counter(i.kind for i in items)
    assert items[0].kind == "unique"
    assert kinds["duplicate"] / len(items) == pytest.approx(0.2, abs=0.03)
    assert kinds["near_duplicate"] / len(items) == pytest.approx(0.3, abs=0.03)
    assert len({i.id for i in items}) == len(items)
    seen: set[tuple[str, str]] = set()
    for item in items:
        if item.kind == "duplicate":
            assert (item.tenant, item.prompt) in seen
        elif item.kind == "near_duplicate":
            base = next(
                item.prompt.removesuffix(p)
                for p in NEAR_DUPLICATE_PHRASES
                if item.prompt.endswith(p)
            )
            assert (item.tenant, base) in seen and base != item.prompt
        else:
            seen.add((item.tenant, item.prompt))


def test_workload_is_seeded_and_unique_items_stay_unique_past_the_prompt_pool() -> None:
    spec = WorkloadSpec(count=300, duplicate_share=0.0, near_duplicate_share=0.0, seed=3)
    items = build_workload(spec, PROMPTS)
    assert items == build_workload(spec, PROMPTS)
    assert items != build_workload(WorkloadSpec(count=300, seed=4), PROMPTS)
    assert len({(i.tenant, i.prompt) for i in items}) == 300


def test_workload_reads_real_sharegpt_prompts() -> None:
    items = build_workload(WorkloadSpec(count=20, seed=1, max_tokens=32))
    assert all(i.messages[0]["role"] == "user" and i.max_tokens == 32 for i in items)
    assert len({i.prompt for i in items if i.kind == "unique"}) == sum(
        i.kind == "unique" for i in items
    )


def test_workload_rejects_shares_over_one() -> None:
    with pytest.raises(ValueError):
        WorkloadSpec(count=1, duplicate_share=0.6, near_duplicate_share=0.5)


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) == 0.0
    assert summary_ms([1.0, 3.0]) == {
        "p50": 1.0,
        "p95": 3.0,
        "p99": 3.0,
        "max": 3.0,
        "mean": 2.0,
        "count": 2,
    }


def test_open_loop_records_answers_provider_time_failures_and_timeouts() -> None:
    items = build_workload(WorkloadSpec(count=40, seed=2), PROMPTS)

    async def send(item: WorkItem) -> Outcome:
        index = int(item.id.rsplit("-", 1)[1])
        if index % 10 == 1:
            raise ConnectionError("down")
        if index % 10 == 2:
            await asyncio.sleep(5)
        await asyncio.sleep(0.02)
        return Outcome("ok", provider_ms=5.0, stage_ms={"infer": 6.0})

    run = asyncio.run(open_loop(send, items, rate_rps=400, seed=1, timeout_s=0.5, progress=False))
    assert [s.item for s in run.samples] == items
    assert run.statuses() == {"error_ConnectionError": 4, "ok": 32, "timeout_client": 4}
    assert run.answered_share == pytest.approx(0.8)
    assert all(v >= 15.0 for v in run.overheads_ms())
    assert len(run.overheads_ms()) == 32
    stages = run.stage_ms()
    assert stages["infer"] == [6.0] * 32
    assert len(stages[OUTSIDE_STAGES]) == 32 and all(v >= 13.0 for v in stages[OUTSIDE_STAGES])
    assert run.sent_rps > 0


def test_open_loop_sends_at_about_the_asked_rate() -> None:
    items = build_workload(WorkloadSpec(count=300, seed=5), PROMPTS)

    async def send(item: WorkItem) -> Outcome:
        return Outcome("cached", provider_ms=0.0)

    run = asyncio.run(open_loop(send, items, rate_rps=1000, seed=9, progress=False))
    assert 600 < run.sent_rps < 1600


def test_open_loop_records_how_late_the_sender_loop_woke() -> None:
    items = build_workload(WorkloadSpec(count=20, seed=3), PROMPTS)

    async def send(item: WorkItem) -> Outcome:
        if item.id.endswith("-10"):
            time.sleep(0.08)  # noqa: ASYNC251 - holds the loop, as a busy sender does
        await asyncio.sleep(0.03)
        return Outcome("ok")

    run = asyncio.run(open_loop(send, items, rate_rps=200, seed=1, progress=False))
    assert run.loop_lag_ms and max(run.loop_lag_ms) >= 60.0
    assert percentile(run.loop_lag_ms, 0.5) < 20.0


def test_open_loop_sends_with_the_cyclic_collector_paused() -> None:
    """Its full collections stalled the sender's loop up to 280 ms in an overload run."""
    items = build_workload(WorkloadSpec(count=10, seed=2), PROMPTS)
    collecting: list[bool] = []

    async def send(item: WorkItem) -> Outcome:
        collecting.append(gc.isenabled())
        return Outcome("ok")

    assert gc.isenabled()
    asyncio.run(open_loop(send, items, rate_rps=500, seed=1, progress=False))
    assert collecting == [False] * 10
    assert gc.isenabled()


def test_open_loop_leaves_a_paused_collector_paused() -> None:
    items = build_workload(WorkloadSpec(count=3, seed=2), PROMPTS)

    async def send(item: WorkItem) -> Outcome:
        return Outcome("ok")

    gc.disable()
    try:
        asyncio.run(open_loop(send, items, rate_rps=500, seed=1, progress=False))
        assert not gc.isenabled()
    finally:
        gc.enable()


def run_with(rate: float, latency_ms: float, answered: bool = True) -> LoadRun:
    """A run of 100 sends spread at exactly `rate`, each answered after `latency_ms`."""
    item = WorkItem("x", "t", [{"role": "user", "content": "hi"}], 8, "unique")
    samples = [
        Sample(
            item, i / rate, (i / rate + latency_ms / 1000.0) if answered else None, Outcome("ok")
        )
        for i in range(100)
    ]
    return LoadRun(rate, samples)


def test_sustain_criteria_name_each_failure() -> None:
    criteria = SustainCriteria(max_p99_ms=100.0)
    assert criteria.failures(run_with(50, 10)) == []
    [slow] = criteria.failures(run_with(50, 500))
    assert slow.startswith("p99 500 ms")
    behind = run_with(50, 10)
    falling = [Sample(s.item, s.sent_at, s.sent_at * 2 + 0.01, s.outcome) for s in behind.samples]
    assert criteria.failures(LoadRun(50, falling))[0].startswith("answers 25 req/s < 48")
    lucky = LoadRun(60, behind.samples, scheduled_rps=50.0)
    assert criteria.failures(lucky) == []
    assert any(r.startswith("answered 0.0%") for r in criteria.failures(run_with(50, 10, False)))
    late_sender = LoadRun(100, run_with(50, 10).samples)
    assert criteria.failures(late_sender)[0].startswith("sent 50 req/s")


def test_max_sustained_rate_doubles_then_bisects() -> None:
    capacity = 300.0

    async def run_at(rate: float) -> LoadRun:
        return run_with(rate, 10 if rate <= capacity else 5000)

    search = asyncio.run(max_sustained_rate(run_at, SustainCriteria(), 50, 10_000, refine_steps=3))
    assert [t.rate_rps for t in search.trials] == [50, 100, 200, 400, 300, 350, 325]
    assert [t.sustained for t in search.trials] == [True, True, True, False, True, False, False]
    assert search.max_sustained_rps == 300.0


def test_max_sustained_rate_stops_at_the_ceiling_and_reports_zero_when_nothing_holds() -> None:
    async def always(rate: float) -> LoadRun:
        return run_with(rate, 10)

    async def never(rate: float) -> LoadRun:
        return run_with(rate, 10, answered=False)

    capped = asyncio.run(max_sustained_rate(always, SustainCriteria(), 100, 250))
    assert [t.rate_rps for t in capped.trials] == [100, 200, 250]
    assert capped.max_sustained_rps == 250
    assert (
        asyncio.run(max_sustained_rate(never, SustainCriteria(), 100, 250, 2)).max_sustained_rps
        == 0
    )


def test_outcome_takes_provider_time_except_from_a_merged_follower() -> None:
    ok = LLMResponse(id="a", status=Status.OK, upstream_ms=50.0, stage_latency_ms={"route": 2.0})
    assert outcome_of(ok) == Outcome("ok", 50.0, {"route": 2.0})
    assert outcome_of(LLMResponse(id="a", status=Status.CACHED)).provider_ms == 0.0
    assert outcome_of(LLMResponse(id="a", status=Status.MERGED)).provider_ms is None
    error = ErrorInfo(code=ErrorCode.TIMEOUT, reason="deadline_exceeded", message="late")
    failed = outcome_of(LLMResponse(id="a", status=Status.ERROR, error=error))
    assert (failed.status, failed.reason) == ("error_timeout", "deadline_exceeded")
    assert outcome_of(ok).reason is None

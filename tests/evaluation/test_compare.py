"""The comparison of two runs: the task answers it can check, its arithmetic, the page."""

from __future__ import annotations

import base64
import re

from evaluation.compare import Run, compare, render_html, rows, task_item
from llmflow.client import new_request
from llmflow.replay import shadow_copy
from models.tasks import make_items
from schemas.messages import ErrorCode, ErrorInfo, LLMRequest, LLMResponse, Status, dump


def test_every_generated_task_prompt_is_recognised_with_its_answer() -> None:
    for task in ("add", "reverse", "sort"):
        for difficulty in ("easy", "hard"):
            for item in make_items(task, difficulty, 20, seed=7):
                assert task_item(item.prompt) == item


def test_chat_prompts_are_not_checkable() -> None:
    assert task_item("How do I add 2+3 in Python?") is None
    assert task_item("sort my emails=") is None


def answer(request: LLMRequest, at: float, **fields: object) -> LLMResponse:
    values: dict[str, object] = {"id": request.id, "status": Status.OK, "created_at": at}
    values.update(fields)
    return LLMResponse.model_validate(values)


def run_of(name: str, requests: list[LLMRequest], responses: list[LLMResponse]) -> Run:
    run = Run(name)
    for request in requests:
        run.add_request(dump(request))
    for response in responses:
        run.add_response(dump(response))
    return run


def two_runs() -> tuple[Run, Run]:
    """Four requests. Live: a right sum from zoo-small, a cache hit, a merge, and a
    rate-limited one, plus a second answer to the first. Shadow (replayed at 1000 s):
    the sum wrong from sim-small, the others answered by sim-small, one never answered."""
    prompts = ["add 12+30=", "hello", "hello", "reverse abc="]
    live = [new_request(p, "acme", created_at=10.0) for p in prompts]
    shadow = [shadow_copy(r, "shadow.llm.responses", now=1000.0) for r in live]
    a, b, c, d = live
    baseline = run_of(
        "live",
        live,
        [
            answer(a, 10.1, output="42", model="zoo-small", cost_usd=0.002),
            answer(a, 10.5, output="41", model="zoo-small", cost_usd=0.002),
            answer(
                b, 10.2, status=Status.CACHED, output="hi", model="sim-small", cache_kind="exact"
            ),
            answer(c, 10.3, status=Status.MERGED, output="hi", model="sim-small"),
            answer(
                d,
                10.4,
                status=Status.ERROR,
                error=ErrorInfo(code=ErrorCode.RATE_LIMITED, reason="tenant", message="slow"),
            ),
        ],
    )
    candidate = run_of(
        "shadow",
        shadow,
        [
            answer(a, 1000.2, output="4", model="sim-small", cost_usd=0.001),
            answer(b, 1000.4, output="hi", model="sim-small", cost_usd=0.003),
            answer(c, 1000.6, output="hello", model="sim-small", cost_usd=0.0005),
        ],
    )
    return baseline, candidate


def test_each_run_is_counted_on_the_candidates_ids() -> None:
    baseline, candidate = two_runs()
    comparison = compare(baseline, candidate)
    b, c = comparison.baseline, comparison.candidate
    assert comparison.compared == 4
    assert (b.requests, b.answered, b.missing, b.duplicate_answers) == (4, 4, 0, 1)
    assert (c.requests, c.answered, c.missing, c.duplicate_answers) == (4, 3, 1, 0)
    assert b.status == {"ok": 1, "cached": 1, "merged": 1, "error": 1}
    assert b.errors == {"rate_limited": 1}
    assert b.models == {"zoo-small": 1, "sim-small": 2, "none": 1}
    assert c.models == {"sim-small": 3}
    assert b.cost_usd == 0.002 and c.cost_usd == 0.0045
    assert (b.cache_hit_rate, b.merge_rate, b.cache_kinds) == (0.25, 0.25, {"exact": 1})
    assert (c.cache_hit_rate, c.merge_rate) == (0.0, 0.0)
    # Two checkable prompts each; live got the sum right, the shadow nothing right.
    assert (b.checkable, b.correct, b.accuracy) == (2, 1, 0.5)
    assert (c.checkable, c.correct, c.accuracy) == (1, 0, 0.0)
    # The ids both answered without error: the sum (differs) and "hello" twice (one same).
    assert (comparison.both_answered, comparison.same_answer) == (3, 1)


def test_latency_starts_at_the_replay_for_replayed_requests() -> None:
    baseline, candidate = two_runs()
    comparison = compare(baseline, candidate)
    assert sorted(round(x) for x in comparison.baseline.latencies_ms) == [100, 200, 300, 400]
    assert sorted(round(x) for x in comparison.candidate.latencies_ms) == [200, 400, 600]
    assert comparison.candidate.latency_from_replay == 3
    assert comparison.baseline.latency_from_replay == 0
    assert comparison.candidate.latency_ms["p50"] is not None
    assert round(comparison.candidate.latency_ms["p50"]) == 400


def test_requests_only_the_baseline_holds_are_left_out() -> None:
    baseline, candidate = two_runs()
    extra = new_request("only live", "acme")
    baseline.add_request(dump(extra))
    baseline.add_response(dump(answer(extra, extra.created_at + 1, output="x")))
    baseline.add_request(b"not json")
    assert compare(baseline, candidate).baseline.requests == 4


def test_the_report_and_its_table_hold_both_runs() -> None:
    comparison = compare(*two_runs())
    report = comparison.report()
    assert report["baseline"]["accuracy"] == 0.5
    assert "latencies_ms" not in report["candidate"]
    table = {name: (b, c) for name, b, c in rows(comparison)}
    assert table["model zoo-small"] == ("1", "0")
    assert table["error rate_limited"] == ("1", "0")
    assert table["missing"] == ("0", "1")


def test_the_page_embeds_the_three_plots_as_png() -> None:
    page = render_html(compare(*two_runs()))
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == ["latency CDF", "routing mix", "cost"]
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert "<tr><td>model zoo-small</td><td>1</td><td>0</td></tr>" in page

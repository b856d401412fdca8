"""`bench.faults`: its counting, and a small run against an in-process simulated provider."""

from __future__ import annotations

from bench.faults import Answer, outcome_of, send_all, sent_rate, summarize
from provider.simulated import SimulatedProviderConfig, start_server
from schemas.messages import (
    ChatMessage,
    Envelope,
    ErrorCode,
    LLMRequest,
    Result,
    Role,
    Status,
)
from topology.settings import ModelSpec, Settings


def test_outcomes_name_errors_by_reason_and_degraded_answers_by_kind() -> None:
    request = LLMRequest(id="r", tenant="t", messages=[ChatMessage(role=Role.USER, content="hi")])
    env = Envelope(request=request, model="sim-small")
    env.fail(ErrorCode.TIMEOUT, "upstream_timeout", "late")
    assert outcome_of(env) == "error_upstream_timeout"
    env.status, env.result = Status.OK, Result(output="x", degraded="cheaper_model")
    assert outcome_of(env) == "degraded_cheaper_model"
    env.result = Result(output="x")
    assert outcome_of(env) == "ok"


def test_summary_counts_only_answers_in_time_towards_the_target() -> None:
    answers = [
        Answer("a", 0.0, "ok", 0.1, True, "a"),
        Answer("a", 0.1, "degraded_cache", 0.2, True, "a"),
        Answer("b", 0.2, "ok", 9.0, False, "b"),
        Answer("b", 0.3, "error_http_500", 0.3, True, None),
    ]
    summary = summarize(answers)
    assert summary["answered_in_time"] == 0.5
    assert summary["answered_in_full_in_time"] == 0.25
    assert summary["answered_late"] == 1
    assert summary["outcomes"] == {"degraded_cache": 1, "error_http_500": 1, "ok": 2}
    assert sent_rate(answers) == 10.0


async def test_a_small_run_answers_every_request() -> None:
    config = SimulatedProviderConfig(latency_ms=5.0, error_rate=0.3, seed=1)
    runner, port = await start_server(config)
    try:
        models = [ModelSpec(name="sim-small"), ModelSpec(name="sim-large", input_per_1k=1.0)]
        settings = Settings(models=models, provider_url=f"http://127.0.0.1:{port}/v1")
        answers = await send_all(settings, count=30, rate=300.0, deadline_s=5.0, seed=0)
    finally:
        await runner.cleanup()
    assert len(answers) == 30
    assert {a.routed for a in answers} == {"sim-small", "sim-large"}
    assert summarize(answers)["answered_in_time"] == 1.0

"""eval-replay: the ShareGPT workload, answer paths, stale-replay tracing and the report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

import pytest

from evaluation.replay.run import (
    AGENT,
    FIRST,
    FOLLOW_UP,
    LATER,
    Outcome,
    Sent,
    agent_turns,
    answer_path,
    build_workload,
    conversation_turns,
    plot,
    report,
    table,
    tenant_for,
    trace_served,
)
from llmflow.cli import main, parser
from llmflow.prompts import Conversation, load_conversations
from schemas.messages import (
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    LLMRequest,
    LLMResponse,
    Role,
    Status,
)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role=Role.USER, content=text)


def _assistant(text: str) -> ChatMessage:
    return ChatMessage(role=Role.ASSISTANT, content=text)


def _sent(request_id: str, tenant: str, messages: list[ChatMessage], kind: str = FIRST) -> Sent:
    return Sent(LLMRequest(id=request_id, tenant=tenant, messages=messages), kind, request_id)


def test_conversations_keep_natural_repeats_in_file_order() -> None:
    conversations = load_conversations(1000)
    assert len(conversations) == 1000
    assert load_conversations(50) == conversations[:50]
    firsts = Counter(c.messages[0].content for c in conversations)
    assert sum(n - 1 for n in firsts.values()) > 0
    assert all(c.messages[0].role is Role.USER for c in conversations)
    assert all(c.id.endswith("_0") for c in conversations)
    assert any(sum(m.role is Role.USER for m in c.messages) >= 2 for c in conversations)


def test_later_turns_carry_the_real_conversation_before_them() -> None:
    messages = [_user("a"), _assistant("b"), _user("c"), _assistant("d"), _user("e")]
    conversation = Conversation("x_0", messages)
    assert conversation_turns(conversation, 2) == [messages[:1], messages[:3]]
    assert conversation_turns(conversation, 5) == [messages[:1], messages[:3], messages]
    assert conversation_turns(conversation, 5, max_chars=3) == [messages[:1], messages[:3]]


def test_workload_keeps_repeats_and_a_tenant_per_conversation() -> None:
    hello = [_user("hello"), _assistant("hi"), _user("continue")]
    conversations = [
        Conversation("a_0", hello),
        Conversation("b_0", [_user("what is kafka?")]),
        Conversation("c_0", hello),
    ]
    workload = build_workload(
        conversations, tenants=3, max_turns=3, agent_traces=0, turns_per_agent=0
    )
    assert [s.kind for s in workload] == [FIRST, FIRST, FIRST, LATER, LATER]
    assert [s.trace for s in workload] == ["a_0", "b_0", "c_0", "a_0", "c_0"]
    assert Counter(s.request.last_user_turn() for s in workload)["hello"] == 2
    for sent in workload:
        assert sent.request.tenant == tenant_for(sent.trace, 3)
    assert len({s.request.id for s in workload}) == len(workload)


def test_agent_loops_repeat_the_follow_up_while_the_tool_result_changes() -> None:
    turns = agent_turns(0, 3, seed=1)
    assert [t[-1].content for t in turns] == [FOLLOW_UP] * 3
    assert [len(t) for t in turns] == [5, 7, 9]
    assert turns[1][:4] == turns[0][:4]
    results = [t[-2].content for t in turns]
    assert len(set(results)) == 3 and all(t[-2].role is Role.TOOL for t in turns)
    twin = agent_turns(1, 3, seed=1)
    assert twin[0][:3] == turns[0][:3] and twin[0][3] != turns[0][3]

    workload = build_workload([], tenants=4, max_turns=1, agent_traces=2, turns_per_agent=3)
    assert [s.kind for s in workload] == [AGENT] * 6
    assert [s.trace for s in workload[:2]] == ["agent-0", "agent-1"]
    assert workload[0].request.tenant == workload[1].request.tenant


def test_answer_paths() -> None:
    def path(**fields: object) -> str:
        return answer_path(LLMResponse.model_validate({"id": "r", **fields}))

    assert path(status="ok") == "model"
    assert path(status="cached", cache_kind="exact", cache_tier="l2") == "cache_exact"
    assert path(status="cached", cache_kind="semantic") == "cache_semantic"
    assert path(status="merged", merged_with="a") == "merge_exact"
    assert path(status="merged", merged_with="a", merge_kind="semantic") == "merge_semantic"
    error = ErrorInfo(code=ErrorCode.RATE_LIMITED, reason="tenant", message="slow down")
    assert path(status="error", error=error) == "error_rate_limited"


def _traced_run() -> tuple[list[Sent], dict[str, LLMResponse]]:
    """A model answer and the served answers a correct or a faulty pipeline could give."""
    question = [_user("What is Kafka?")]
    history = [_user("Tell me about logs."), _assistant("Logs are..."), _user("What is Kafka?")]
    workload = [
        _sent("model", "acme", question),
        _sent("hit", "acme", [_user("What is  Kafka?")]),
        _sent("paraphrase", "acme", [_user("What's Kafka?")]),
        _sent("other-tenant", "globex", question),
        _sent("other-history", "acme", history, LATER),
        _sent("follower", "acme", question),
        _sent("leaked-follower", "acme", history, LATER),
        _sent("lost", "acme", [_user("Hi")]),
    ]
    answer = "[sim-small] answer 1234abcd: What is Kafka? alpha"

    def cached(
        request_id: str,
        kind: Literal["exact", "semantic"],
        tier: Literal["l1", "l2"] | None = None,
    ) -> LLMResponse:
        return LLMResponse(
            id=request_id, status=Status.CACHED, output=answer, cache_kind=kind, cache_tier=tier
        )

    responses = [
        LLMResponse(id="model", status=Status.OK, output=answer, cost_usd=0.01),
        cached("hit", "exact", "l1"),
        cached("paraphrase", "semantic", "l1"),
        cached("other-tenant", "exact", "l2"),
        cached("other-history", "semantic"),
        LLMResponse(id="follower", status=Status.MERGED, merged_with="model", output=answer),
        LLMResponse(id="leaked-follower", status=Status.MERGED, merged_with="model"),
        LLMResponse(id="lost", status=Status.CACHED, cache_kind="exact", output="from nowhere"),
    ]
    return workload, {r.id: r for r in responses}


def test_a_served_answer_from_another_context_is_a_stale_replay() -> None:
    workload, responses = _traced_run()
    traces = trace_served(workload, responses)
    assert sorted(t.served for t in traces.values() if t.stale) == [
        "leaked-follower",
        "other-history",
        "other-tenant",
    ]
    assert {t.source for t in traces.values()} == {"model", None}
    assert [t.served for t in traces.values() if t.source is None] == ["lost"]


def test_an_answer_some_same_context_model_call_produced_is_not_stale() -> None:
    question = [_user("What is Kafka?")]
    workload = [_sent("a", "acme", question), _sent("b", "globex", question)]
    workload.append(_sent("c", "globex", question))
    answer = "same text for both tenants"
    responses = {
        "a": LLMResponse(id="a", status=Status.OK, output=answer),
        "b": LLMResponse(id="b", status=Status.OK, output=answer),
        "c": LLMResponse(id="c", status=Status.CACHED, cache_kind="exact", output=answer),
    }
    assert trace_served(workload, responses)["c"].source == "b"


def test_report_counts_shares_cost_and_missing(tmp_path: Path) -> None:
    workload, responses = _traced_run()
    workload.append(_sent("unanswered", "acme", [_user("Anyone there?")]))
    outcome = Outcome(
        sent_s={s.request.id: float(i) for i, s in enumerate(workload)},
        responses=responses,
        latency_ms={request_id: 100.0 for request_id in responses},
    )
    result = report(workload, outcome, {"rate": 1.0})
    assert result["requests"] == 9 and result["answered"] == 8 and result["missing"] == 1
    assert result["paths"]["model"] == {"count": 1, "share": round(1 / 9, 4)}
    assert result["paths"]["cache_exact"]["count"] == 3
    assert result["paths"]["merge_exact"]["count"] == 2
    assert result["cache_tiers"] == {"l1": 2, "l2": 1}
    assert result["stale_replays"] == 3 and result["untraced_served"] == 1
    assert result["workload"] == {"first_turn": 7, "later_turn": 2, "agent_turn": 0}
    # Six served answers traced to the 0.01 call, the untraced one at the mean call.
    assert result["cost_usd"]["with_pipeline"] == 0.01
    assert result["cost_usd"]["without_cache_or_merge"] == pytest.approx(0.08)
    assert result["semantic_examples"][0]["served"] == "What's Kafka?"
    assert len(result["records"]) == 9 and result["records"][-1]["path"] == "missing"
    assert result["records"][1] == {
        "id": "hit",
        "kind": "first_turn",
        "tenant": "acme",
        "path": "cache_exact",
        "source": "model",
        "sent_s": 1.0,
        "latency_ms": 100.0,
    }
    assert "stale replays" in table(result)
    json.dumps(result)
    plot(result, tmp_path / "replay.png")
    assert (tmp_path / "replay.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_replay_parses() -> None:
    args = parser().parse_args(["eval-replay", "--json", "out.json", "--prompts", "50"])
    assert args.prompts == 50 and args.workers == 1 and args.plot is None


@pytest.mark.integration
def test_a_small_replay_through_the_embedded_stack(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    argv = ["eval-replay", "--json", str(out), "--prompts", "20", "--rate", "20"]
    assert main([*argv, "--agent-traces", "2", "--agent-turns", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["answered"] == result["requests"] > 20
    assert result["stale_replays"] == 0
    assert result["settings"]["semantic"]["enabled"] is True

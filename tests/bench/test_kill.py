"""The bookkeeping of `llmflow bench kill`: first answers, backlog and gaps after a kill."""

from __future__ import annotations

from bench.kill import LoadRecord
from schemas.messages import LLMResponse, Status


def ok(request_id: str) -> LLMResponse:
    return LLMResponse(id=request_id, status=Status.OK)


def test_the_first_answer_counts_and_the_backlog_is_the_last_pre_kill_answer() -> None:
    record = LoadRecord(sent={"a": 0.0, "b": 1.0, "c": 3.0}, killed_at=2.0)
    record.answer("a", ok("a"), 0.5)
    record.answer("c", ok("c"), 4.0)
    assert record.unanswered() == ["b"]
    assert record.backlog_s() is None  # b, sent before the kill, is still waiting
    record.answer("b", ok("b"), 9.0)
    record.answer("b", ok("b"), 10.0)
    assert record.answered["b"] == 9.0
    assert record.backlog_s() == 7.0
    assert record.longest_gap_s() == 5.0  # from c's answer at 4 to b's at 9
    assert record.statuses == {"ok": 3}
    assert record.summary()["latency_max_s"] == 8.0

"""postprocess.finish and merged_answer."""

from __future__ import annotations

from agents.postprocess import finish, leader_timed_out, merged_answer
from schemas.messages import Envelope, ErrorCode, LLMRequest, Result, Status, Usage


def envelope(request_id: str, status: Status | None = None, res: Result | None = None) -> Envelope:
    request = LLMRequest(id=request_id, tenant="acme", messages=[{"role": "user", "content": "q"}])
    return Envelope(request=request, status=status, result=res, fingerprint="f" * 64)


def result(output: str | None = "  Paris.\n\n") -> Result:
    return Result(
        output=output,
        finish_reason="stop",
        model="sim-small",
        usage=Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
        cost_usd=0.003,
    )


def test_finish_strips_the_output_and_keeps_status() -> None:
    env = envelope("a", Status.OK, result())
    finish(env)
    assert env.result is not None and env.result.output == "Paris."
    assert env.status == Status.OK


def test_finish_keeps_cached_status() -> None:
    env = envelope("a", Status.CACHED, result("Paris."))
    finish(env)
    assert env.status == Status.CACHED


def test_finish_sets_a_missing_status() -> None:
    ok = envelope("a", None, result())
    finish(ok)
    assert ok.status == Status.OK

    empty = envelope("b", None, None)
    finish(empty)
    assert empty.status == Status.ERROR

    errored = envelope("c", None, None)
    errored.fail(ErrorCode.TIMEOUT, "upstream_timeout", "slow")
    errored.status = None
    finish(errored)
    assert errored.status == Status.ERROR


def test_finish_leaves_a_missing_output_alone() -> None:
    env = envelope("a", Status.OK, result(None))
    finish(env)
    assert env.result is not None and env.result.output is None


def test_merged_answer_copies_the_leaders_result() -> None:
    leader = envelope("lead", Status.OK, result("Paris."))
    leader.model = "sim-small"
    follower = envelope("follow")
    follower.stage_latency_ms = {"dedup": 1.5}
    merged = merged_answer(follower, leader)
    assert merged is follower
    assert merged.status == Status.MERGED
    assert merged.merged_with == "lead"
    assert merged.model == "sim-small"
    assert merged.request.id == "follow"
    assert merged.result == leader.result
    assert merged.result is not leader.result  # a deep copy, not shared
    assert merged.stage_latency_ms == {"dedup": 1.5}


def test_merged_answer_of_a_cached_leader_is_merged() -> None:
    leader = envelope("lead", Status.CACHED, result("Paris."))
    assert merged_answer(envelope("f"), leader).status == Status.MERGED


def test_merged_answer_of_a_failed_leader_is_an_error() -> None:
    leader = envelope("lead")
    leader.fail(ErrorCode.UPSTREAM_ERROR, "http_500", "boom")
    merged = merged_answer(envelope("f"), leader)
    assert merged.status == Status.ERROR
    assert merged.merged_with == "lead"
    assert merged.result is not None and merged.result.error is not None
    assert merged.result.error.reason == "http_500"


def test_merged_answer_without_a_leader_result() -> None:
    leader = envelope("lead", Status.ERROR, None)
    merged = merged_answer(envelope("f"), leader)
    assert merged.result is None
    assert merged.status == Status.ERROR


def test_only_a_timeout_of_the_leader_itself_counts_as_timed_out() -> None:
    leader = envelope("a")
    leader.fail(ErrorCode.TIMEOUT, "deadline_exceeded", "late")
    assert leader_timed_out(leader)
    upstream = envelope("b")
    upstream.fail(ErrorCode.UPSTREAM_ERROR, "http_500", "down")
    assert not leader_timed_out(upstream)
    assert not leader_timed_out(envelope("c", Status.OK, result()))

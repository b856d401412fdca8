"""postprocess.finish and release."""

from __future__ import annotations

from agents.postprocess import finish, release
from schemas.messages import (
    ChatMessage,
    Envelope,
    ErrorCode,
    LLMRequest,
    Result,
    Role,
    Status,
    Usage,
)


def envelope(request_id: str, status: Status | None = None, res: Result | None = None) -> Envelope:
    request = LLMRequest(
        id=request_id, tenant="acme", messages=[ChatMessage(role=Role.USER, content="q")]
    )
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


def test_a_follower_takes_a_copy_of_the_leaders_answer() -> None:
    leader = envelope("lead", Status.OK, result("Paris."))
    leader.model = "sim-small"
    follower = envelope("follow")
    follower.stage_latency_ms = {"dedup": 1.5}
    assert release(follower, leader) == "respond"
    assert follower.status == Status.MERGED
    assert follower.merged_with == "lead"
    assert follower.model == "sim-small"
    assert follower.request.id == "follow"
    assert follower.result == leader.result
    assert follower.result is not leader.result  # a deep copy, not shared
    assert follower.stage_latency_ms == {"dedup": 1.5}


def test_a_follower_of_a_cached_leader_is_merged() -> None:
    leader = envelope("lead", Status.CACHED, result("Paris."))
    follower = envelope("f")
    assert release(follower, leader) == "respond" and follower.status == Status.MERGED


def test_a_follower_of_a_failed_leader_goes_on_alone() -> None:
    leader = envelope("lead")
    leader.fail(ErrorCode.UPSTREAM_ERROR, "http_500", "boom")
    follower = envelope("f")
    follower.merge_kind = "semantic"
    assert release(follower, leader) == "cache"
    assert follower.status is None and follower.result is None
    assert follower.merged_with is None and follower.merge_kind is None
    assert release(envelope("g"), envelope("lead", Status.ERROR, None)) == "cache"


def test_followers_of_a_leader_out_of_its_own_time_lead_anew() -> None:
    leader = envelope("a")
    leader.fail(ErrorCode.TIMEOUT, "deadline_exceeded", "late")
    follower = envelope("f")
    assert release(follower, leader) == "dedup" and follower.result is None


def test_a_follower_past_its_own_deadline_times_out() -> None:
    follower = envelope("f")
    follower.request.deadline = 1.0
    assert release(follower, envelope("lead", Status.OK, result("Paris."))) == "respond"
    assert follower.status is Status.ERROR and follower.result is not None
    assert follower.result.error is not None and follower.result.error.code is ErrorCode.TIMEOUT


def test_a_follower_cancelled_while_merged_is_answered_cancelled() -> None:
    follower = envelope("f")
    leader = envelope("lead", Status.OK, result("Paris."))
    assert release(follower, leader, "user left") == "respond"
    assert follower.status is Status.ERROR and follower.result is not None
    assert follower.result.error is not None
    assert follower.result.error.code is ErrorCode.CANCELLED
    assert follower.merged_with is None

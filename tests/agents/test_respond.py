"""respond.build_response and stream_chunks."""

from __future__ import annotations

import pytest

from agents.respond import build_response, chunks_sent_by_infer, stream_chunks
from schemas.messages import (
    ChatMessage,
    Envelope,
    ErrorCode,
    ErrorInfo,
    LLMRequest,
    LLMResponse,
    Result,
    Role,
    Status,
    Usage,
)


def envelope(status: Status | None, res: Result | None = None) -> Envelope:
    request = LLMRequest(
        id="r1", tenant="acme", messages=[ChatMessage(role=Role.USER, content="q")]
    )
    return Envelope(
        request=request,
        status=status,
        result=res,
        model="sim-small",
        received_at=100.0,
        stage_latency_ms={"preprocess": 1.23456, "infer": 20.0},
    )


def result(cache_tier: str | None = None) -> Result:
    return Result(
        output="Paris is the capital.",
        finish_reason="stop",
        model="sim-large",
        usage=Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9),
        cost_usd=0.0125,
        cache_tier=cache_tier,  # type: ignore[arg-type]
    )


def test_ok_response() -> None:
    response = build_response(envelope(Status.OK, result()), now=100.5)
    assert response.id == "r1"
    assert response.tenant == "acme"
    assert response.status == Status.OK
    assert response.output == "Paris is the capital."
    assert response.finish_reason == "stop"
    assert response.model == "sim-large"
    assert response.usage.total_tokens == 9
    assert response.cost_usd == 0.0125
    assert response.cache_kind is None and response.cache_tier is None
    assert response.merged_with is None
    assert response.error is None
    assert response.latency_ms == 500.0
    assert response.stage_latency_ms == {"preprocess": 1.235, "infer": 20.0}


def test_response_model_falls_back_to_the_routed_model() -> None:
    res = result()
    res.model = None
    response = build_response(envelope(Status.OK, res), now=100.0)
    assert response.model == "sim-small"


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_cached_response_is_free(tier: str) -> None:
    response = build_response(envelope(Status.CACHED, result(tier)), now=100.0)
    assert response.status == Status.CACHED
    assert response.cache_kind == "exact"
    assert response.cache_tier == tier
    assert response.cost_usd == 0.0
    assert response.output == "Paris is the capital."


def test_merged_response_names_the_leader_and_is_free() -> None:
    env = envelope(Status.MERGED, result())
    env.merged_with = "leader-7"
    response = build_response(env, now=100.0)
    assert response.status == Status.MERGED
    assert response.merged_with == "leader-7"
    assert response.output == "Paris is the capital."
    assert response.cost_usd == 0.0


def test_error_keeps_the_error_and_has_no_output() -> None:
    env = envelope(None)
    env.fail(ErrorCode.RATE_LIMITED, "tenant_request_rate", "over limit", retry_after_s=0.5)
    response = build_response(env, now=100.0)
    assert response.status == Status.ERROR
    assert response.error == ErrorInfo(
        code=ErrorCode.RATE_LIMITED,
        reason="tenant_request_rate",
        message="over limit",
        retry_after_s=0.5,
    )
    assert response.output is None
    assert response.finish_reason is None
    assert response.cost_usd == 0.0


def test_no_status_and_no_result_is_an_error_never_silence() -> None:
    response = build_response(envelope(None, None), now=100.0)
    assert response.status == Status.ERROR
    assert response.error is not None
    assert response.error.code == ErrorCode.UPSTREAM_ERROR
    assert response.error.reason == "no_result"
    assert response.output is None


def test_error_status_with_a_result_but_no_error_gets_one() -> None:
    response = build_response(envelope(Status.ERROR, result()), now=100.0)
    assert response.error is not None and response.error.reason == "no_result"
    assert response.output is None
    assert response.cost_usd == 0.0


@pytest.mark.parametrize(
    "output",
    ["Paris is the capital.", "one", "", "double  space\nand newline ", " leading"],
)
def test_stream_chunks_join_to_the_output(output: str) -> None:
    response = LLMResponse(id="r1", status=Status.OK, output=output)
    chunks = stream_chunks(response)
    assert "".join(c.delta for c in chunks) == output
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.id == "r1" for c in chunks)
    assert chunks[-1].done is True and chunks[-1].delta == "" and chunks[-1].error is None
    assert not any(c.done for c in chunks[:-1])


def test_stream_chunks_are_words() -> None:
    chunks = stream_chunks(LLMResponse(id="r1", status=Status.OK, output="a b c"))
    assert [c.delta for c in chunks] == ["a", " b", " c", ""]


def test_stream_chunks_of_an_error_is_one_done_chunk_with_the_error() -> None:
    error = ErrorInfo(code=ErrorCode.TIMEOUT, reason="deadline_exceeded", message="late")
    chunks = stream_chunks(LLMResponse(id="r1", status=Status.ERROR, error=error))
    assert len(chunks) == 1
    assert chunks[0].done is True
    assert chunks[0].index == 0
    assert chunks[0].error == error


def test_after_a_streamed_answer_only_the_done_chunk_is_left() -> None:
    chunks = stream_chunks(LLMResponse(id="r1", status=Status.OK, output="a b c"), 5)
    assert [(c.index, c.delta, c.done) for c in chunks] == [(5, "", True)]


def test_a_stream_broken_by_an_error_ends_with_an_error_chunk_after_its_last() -> None:
    error = ErrorInfo(code=ErrorCode.UPSTREAM_ERROR, reason="stream_broken", message="cut")
    broken = envelope(Status.ERROR, Result(error=error, streamed_chunks=3))
    assert chunks_sent_by_infer(broken) == 3
    (last,) = stream_chunks(build_response(broken, now=101.0), chunks_sent_by_infer(broken))
    assert last.index == 3 and last.done and last.error == error


def test_followers_and_cache_hits_stream_their_own_chunks() -> None:
    streamed = result()
    streamed.streamed_chunks = 4
    leader = envelope(Status.OK, streamed)
    assert chunks_sent_by_infer(leader) == 4
    follower = envelope(Status.MERGED, streamed.model_copy())
    follower.merged_with = "leader-id"
    assert chunks_sent_by_infer(follower) == 0
    assert chunks_sent_by_infer(envelope(Status.CACHED, streamed.model_copy())) == 0


def test_the_response_says_how_much_of_its_latency_was_the_model_calls() -> None:
    called = envelope(Status.OK, result())
    called.upstream_ms = 212.34567
    response = build_response(called, now=100.5)
    assert response.upstream_ms == 212.346 and response.latency_ms == 500.0
    assert build_response(envelope(Status.CACHED, result("l1")), now=100.5).upstream_ms == 0.0

"""The client's stream reassembly: chunks in order, repeats dropped, the end always comes."""

from __future__ import annotations

import asyncio

import pytest

from llmflow.client import STREAM_GRACE_S, ChunkOrder, Streamed
from schemas.messages import ErrorCode, ErrorInfo, LLMResponse, Status, StreamChunk


def chunk(index: int, delta: str, done: bool = False) -> StreamChunk:
    return StreamChunk(id="r1", index=index, delta=delta, done=done)


def answered(output: str) -> LLMResponse:
    return LLMResponse(id="r1", status=Status.OK, output=output)


LIMITED = ErrorInfo(code=ErrorCode.RATE_LIMITED, reason="tenant", message="slow down")


def test_chunks_come_out_in_index_order_once_each() -> None:
    order = ChunkOrder("r1")
    assert order.add(chunk(1, " b")) == []
    assert [c.delta for c in order.add(chunk(0, "a"))] == ["a", " b"]
    assert order.add(chunk(0, "a")) == [] and order.add(chunk(1, " b")) == []
    assert [c.done for c in order.add(chunk(2, "", done=True))] == [True]
    assert order.text == "a b" and order.done
    assert order.add(chunk(3, " late")) == []


def test_finish_sends_the_rest_of_the_answer_then_done() -> None:
    order = ChunkOrder("r1")
    order.add(chunk(0, "a"))
    order.add(chunk(2, " c"))
    rest = order.finish(answered("a b c"))
    assert [(c.index, c.delta, c.done) for c in rest] == [(1, " b c", False), (2, "", True)]
    assert order.finish(answered("a b c")) == []


def test_finish_of_an_error_ends_with_it_and_adds_no_text() -> None:
    order = ChunkOrder("r1")
    failed = LLMResponse(id="r1", status=Status.ERROR, error=LIMITED)
    rest = order.finish(failed)
    assert len(rest) == 1 and rest[0].done and rest[0].error == LIMITED


def test_finish_of_an_answer_already_streamed_is_only_done() -> None:
    order = ChunkOrder("r1")
    order.add(chunk(0, "a"))
    assert [(c.delta, c.done) for c in order.finish(answered("a"))] == [("", True)]


async def collect(streamed: Streamed) -> list[StreamChunk]:
    return [c async for c in streamed.chunks()]


async def test_a_stream_ends_at_its_done_chunk() -> None:
    response: asyncio.Future[LLMResponse] = asyncio.get_running_loop().create_future()
    streamed = Streamed("r1", response, timeout=5.0)
    reading = asyncio.ensure_future(collect(streamed))
    streamed.add(chunk(1, "", done=True))
    await asyncio.sleep(0.01)
    assert not reading.done()
    streamed.add(chunk(0, "hi"))
    got = await asyncio.wait_for(reading, 5.0)
    assert [(c.delta, c.done) for c in got] == [("hi", False), ("", True)]
    final = answered("hi")
    response.set_result(final)
    assert await streamed.final() is final


async def test_a_response_without_chunks_still_ends_the_stream() -> None:
    response: asyncio.Future[LLMResponse] = asyncio.get_running_loop().create_future()
    streamed = Streamed("r1", response, timeout=5.0)
    response.set_result(answered("from the response"))
    streamed.wake()
    got = await asyncio.wait_for(collect(streamed), STREAM_GRACE_S + 5.0)
    assert [(c.delta, c.done) for c in got] == [("from the response", False), ("", True)]


async def test_no_answer_in_time_raises_timeout() -> None:
    response: asyncio.Future[LLMResponse] = asyncio.get_running_loop().create_future()
    streamed = Streamed("r1", response, timeout=0.05)
    streamed.add(chunk(0, "partial"))
    with pytest.raises(TimeoutError):
        await collect(streamed)
    assert await streamed.final() is None

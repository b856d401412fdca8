"""The client's stream reassembly (chunks in order, repeats dropped, the end always
comes), its throttle, and which answers it reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer

from llmflow.client import (
    CLIENT_THROTTLED,
    STREAM_GRACE_S,
    ChunkOrder,
    LLMFlowClient,
    Streamed,
    new_request,
    throttle_for,
)
from llmflow.throttle import AdaptiveThrottle
from schemas.messages import (
    ErrorCode,
    ErrorInfo,
    LLMResponse,
    Priority,
    Status,
    StreamChunk,
    dump,
)
from topology.settings import ClientSettings, Settings


def chunk(index: int, delta: str, done: bool = False) -> StreamChunk:
    return StreamChunk(id="r1", index=index, delta=delta, done=done)


def answered(output: str) -> LLMResponse:
    return LLMResponse(id="r1", status=Status.OK, output=output)


LIMITED = ErrorInfo(code=ErrorCode.RATE_LIMITED, reason="tenant", message="slow down")
OVERLOADED = ErrorInfo(code=ErrorCode.OVERLOADED, reason="queued_too_long", message="busy")


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


class RecordingClient(LLMFlowClient):
    """A client that records what it would publish instead of publishing it, and reads no
    stream topic; its throttle (k = `k`, no minimum, no cap) draws 0, so it refuses
    whenever the refusal probability is above 0."""

    def __init__(self, k: float = 2.0) -> None:
        super().__init__(Settings())
        self.throttle = AdaptiveThrottle(k, 10.0, 0, 1.0, draw=lambda: 0.0)
        self.sent: list[bytes | None] = []

    async def send_raw(
        self, raw: bytes, key: bytes | None = None, timestamp_ms: int | None = None
    ) -> None:
        self.sent.append(key)

    async def start_streams(self) -> None:
        return None


def refusing_client() -> RecordingClient:
    """A client whose throttle has seen only 100 `overloaded` answers."""
    client = RecordingClient()
    assert client.throttle is not None
    for _ in range(100):
        client.throttle.answered(accepted=False)
    return client


async def test_a_request_the_throttle_refuses_is_answered_overloaded_by_the_client() -> None:
    client = refusing_client()
    future = await client.submit(new_request("hello"))
    response = future.result()
    assert response.status is Status.ERROR and response.error is not None
    assert response.error.code is ErrorCode.OVERLOADED
    assert response.error.reason == CLIENT_THROTTLED and client.sent == []
    assert client.throttle is not None
    assert client.throttle.refusal_probability() == 101 / 102, "counted as overloaded"


async def test_a_high_priority_request_is_sent_even_when_the_throttle_refuses() -> None:
    client = refusing_client()
    request = new_request("hello", priority=Priority.HIGH)
    future = await client.submit(request)
    assert client.sent == [request.id.encode()] and not future.done()


async def test_a_refused_stream_ends_at_once_with_its_error() -> None:
    client = refusing_client()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.stream(new_request("hello"), timeout=5.0) as streamed:
        got = await collect(streamed)
    assert loop.time() - started < STREAM_GRACE_S / 2
    assert len(got) == 1 and got[0].done and got[0].error is not None
    assert got[0].error.reason == CLIENT_THROTTLED


async def test_answers_other_than_overloaded_count_as_accepted_each_once() -> None:
    client = RecordingClient(k=1.0)
    for request_id, error in (("a", None), ("b", LIMITED), ("c", OVERLOADED)):
        client.expect(request_id)
        status = Status.OK if error is None else Status.ERROR
        client._deliver(LLMResponse(id=request_id, status=status, error=error))
    client._deliver(LLMResponse(id="a", status=Status.OK))
    assert client.throttle is not None
    assert client.throttle.refusal_probability() == (3 - 2) / (3 + 1)


async def test_a_call_that_times_out_counts_as_not_accepted() -> None:
    client = RecordingClient(k=1.0)
    with pytest.raises(TimeoutError):
        await client.call(new_request("hello"), timeout=0.01)
    assert client.throttle is not None and client.throttle.refusal_probability() == 0.5


@dataclass
class Record:
    key: bytes | None
    value: bytes


class Records:
    """Records as the client's consumer would yield them."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    async def __aiter__(self) -> AsyncIterator[Record]:
        for record in self.records:
            yield record


async def test_answers_keyed_to_requests_the_client_does_not_wait_for_are_skipped() -> None:
    client = RecordingClient()
    waiting = client.expect("a")
    unkeyed = client.expect("b")
    wrong = LLMResponse(id="a", status=Status.ERROR, error=OVERLOADED)
    client._consumer = cast(
        AIOKafkaConsumer,
        Records(
            [
                Record(b"someone-else", dump(wrong)),
                Record(b"a", dump(LLMResponse(id="a", status=Status.OK, output="hi"))),
                Record(None, dump(LLMResponse(id="b", status=Status.OK))),
                Record(b"a", dump(LLMResponse(id="a", status=Status.OK))),
            ]
        ),
    )
    await client._listen()
    assert waiting.result().output == "hi" and unkeyed.result().status is Status.OK
    assert client.duplicates == 1


def test_the_throttle_follows_the_client_settings() -> None:
    throttle = throttle_for(ClientSettings(throttle_k=1.5, throttle_min_requests=7))
    assert throttle is not None and (throttle.k, throttle.min_requests) == (1.5, 7)
    assert throttle_for(ClientSettings()) is None

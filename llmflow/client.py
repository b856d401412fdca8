"""Client library: publish requests and await their responses by id.

The client reads its reply topic from the end, assigned rather than in a consumer group, so
any number of clients can share one topic. Under at-least-once delivery a request may be
answered twice; the client keeps the first answer and counts the rest. A request sent with
`stream` gets its chunks from the stream topic, read the same way once a stream is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from llmflow.admin import read_partitions
from llmflow.throttle import AdaptiveThrottle
from schemas.messages import (
    CancelEvent,
    ChatMessage,
    ErrorCode,
    ErrorInfo,
    FeedbackEvent,
    LLMRequest,
    LLMResponse,
    Priority,
    RequestStatus,
    Role,
    Status,
    StreamChunk,
    dump,
)
from streams.locality import kafka_partition
from topology.settings import ClientSettings, Settings

REMEMBERED_ANSWERS = 100_000
# The response and the stream's last chunk travel on different topics, so either may come
# first; this long the other is waited for before the stream is ended from what came.
STREAM_GRACE_S = 1.0
CLIENT_THROTTLED = "client_throttled"


def throttle_for(settings: ClientSettings) -> AdaptiveThrottle | None:
    """The client's throttle as configured; None where it sends everything."""
    if settings.throttle_k is None:
        return None
    return AdaptiveThrottle(
        settings.throttle_k,
        settings.throttle_window_s,
        settings.throttle_min_requests,
        settings.throttle_max_probability,
    )


def throttled(request: LLMRequest, throttle: AdaptiveThrottle) -> LLMResponse:
    """The answer to a request the client refused itself; it never reached Kafka."""
    message = (
        f"the pipeline is answering overloaded: this client sends about {throttle.k:g} times "
        f"what the pipeline accepted over the last {throttle.window_s:g} s and refused this "
        "one itself"
    )
    return LLMResponse(
        id=request.id,
        tenant=request.tenant,
        status=Status.ERROR,
        error=ErrorInfo(code=ErrorCode.OVERLOADED, reason=CLIENT_THROTTLED, message=message),
    )


def refused_here(response: LLMResponse) -> bool:
    return response.error is not None and response.error.reason == CLIENT_THROTTLED


def new_request(prompt: str, tenant: str = "default", **fields: object) -> LLMRequest:
    """A one-turn chat request with a fresh id; `fields` sets any other request field."""
    values: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "tenant": tenant,
        "messages": [ChatMessage(role=Role.USER, content=prompt)],
    }
    values.update(fields)
    return LLMRequest.model_validate(values)


STATUS_TABLE = "request-status"


async def request_status(settings: Settings, request_id: str) -> RequestStatus | None:
    """The status record of `request_id`, read from its partition of the status Table's
    compacted changelog (the last record of its key wins; a tombstone means dropped)."""
    spec = settings.stage("status").topic
    partition = TopicPartition(
        f"{settings.app_id}-{STATUS_TABLE}-changelog",
        kafka_partition(request_id.encode(), spec.partitions),
    )
    key = json.dumps(request_id).encode()
    found: bytes | None = None
    for record in await read_partitions(settings.bootstrap_servers, [partition]):
        if record.key == key:
            found = record.value
    return RequestStatus.model_validate_json(found) if found else None


class ChunkOrder:
    """One request's stream chunks back in index order, repeats (a redelivered request
    streams again) dropped; `finish` ends the stream from the response when its done chunk
    never comes (an invalid request is answered before any stage streams)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_index = 0
        self.text = ""
        self.done = False
        self._held: dict[int, StreamChunk] = {}

    def add(self, chunk: StreamChunk) -> list[StreamChunk]:
        """The chunks that are now next in order."""
        if self.done or chunk.index < self.next_index:
            return []
        self._held.setdefault(chunk.index, chunk)
        ready: list[StreamChunk] = []
        while not self.done and self.next_index in self._held:
            next_chunk = self._held.pop(self.next_index)
            self.next_index += 1
            self.text += next_chunk.delta
            self.done = next_chunk.done
            ready.append(next_chunk)
        if self.done:
            self._held.clear()
        return ready

    def finish(self, response: LLMResponse) -> list[StreamChunk]:
        """What the stream still owes when only the response came: the rest of its answer,
        then the done chunk."""
        if self.done:
            return []
        self.done = True
        self._held.clear()
        output = response.output or ""
        chunks: list[StreamChunk] = []
        if response.error is None and output.startswith(self.text) and output != self.text:
            chunks.append(
                StreamChunk(
                    id=self.request_id, index=self.next_index, delta=output[len(self.text) :]
                )
            )
            self.text = output
        chunks.append(
            StreamChunk(
                id=self.request_id,
                index=self.next_index + len(chunks),
                delta="",
                done=True,
                error=response.error,
            )
        )
        return chunks


class Streamed:
    """A request sent with `stream`: `chunks()` yields its text in order and ends with a done
    chunk (carrying the error, if it failed); `final()` is its terminal response."""

    def __init__(
        self, request_id: str, response: asyncio.Future[LLMResponse], timeout: float
    ) -> None:
        self.response = response
        self.order = ChunkOrder(request_id)
        self._ready: deque[StreamChunk] = deque()
        self._wake = asyncio.Event()
        self._ends_at = asyncio.get_running_loop().time() + timeout

    def add(self, chunk: StreamChunk) -> None:
        self._ready.extend(self.order.add(chunk))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def end(self) -> None:
        """End the stream with its response now, without waiting for chunks."""
        self._ready.extend(self.order.finish(self.response.result()))
        self._wake.set()

    async def chunks(self) -> AsyncGenerator[StreamChunk, None]:
        """Raises TimeoutError when neither the stream's end nor its response came in time."""
        loop = asyncio.get_running_loop()
        grace_ends: float | None = None
        while True:
            while self._ready:
                chunk = self._ready.popleft()
                yield chunk
                if chunk.done:
                    return
            now = loop.time()
            if self.response.done():
                grace_ends = grace_ends or now + STREAM_GRACE_S
                if now >= grace_ends:
                    self._ready.extend(self.order.finish(self.response.result()))
                    continue
                wait_until = grace_ends
            elif now >= self._ends_at:
                raise TimeoutError(f"no answer to {self.order.request_id} in time")
            else:
                wait_until = self._ends_at
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_until - now)

    async def final(self) -> LLMResponse | None:
        """The terminal response once the stream has ended; None if it does not follow."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.response), STREAM_GRACE_S)
        except TimeoutError:
            return None


class LLMFlowClient:
    def __init__(self, settings: Settings, reply_topic: str | None = None) -> None:
        self.settings = settings
        self.reply_topic = reply_topic or settings.topics.responses.name
        self.duplicates = 0
        self._pending: dict[str, asyncio.Future[LLMResponse]] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self.throttle = throttle_for(settings.client)
        # acks="all": a request is sent once every in-sync replica has it, so a broker's
        # crash cannot lose it.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, linger_ms=0, acks="all"
        )
        self._consumer = self._tail_consumer()
        self._listener: asyncio.Task[None] | None = None
        self._streams: dict[str, Streamed] = {}
        self._stream_consumer: AIOKafkaConsumer | None = None
        self._stream_listener: asyncio.Task[None] | None = None
        self._stream_lock = asyncio.Lock()

    def _tail_consumer(self) -> AIOKafkaConsumer:
        """Under exactly-once, answers a crashed worker sent in a transaction it never
        committed are aborted, and only a read_committed consumer skips them."""
        exactly_once = self.settings.processing_guarantee == "exactly_once"
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.settings.consumer_fetch_max_wait_ms,
            isolation_level="read_committed" if exactly_once else "read_uncommitted",
        )

    async def _read_from_end(self, consumer: AIOKafkaConsumer, topic: str) -> None:
        """Assign `consumer` every partition of `topic`, positioned at its end now."""
        partitions = await self._producer.partitions_for(topic)
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_end(*assigned)
        for tp in assigned:
            await consumer.position(tp)

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        try:
            await self._read_from_end(self._consumer, self.reply_topic)
        except BaseException:
            await self.stop()
            raise
        self._listener = asyncio.create_task(self._listen())

    async def start_streams(self) -> None:
        """Read the stream topic from now on; `stream` calls it, a server may call it early."""
        async with self._stream_lock:
            if self._stream_consumer is not None:
                return
            consumer = self._tail_consumer()
            await consumer.start()
            try:
                await self._read_from_end(consumer, self.settings.topics.stream.name)
            except BaseException:
                await consumer.stop()
                raise
            self._stream_consumer = consumer
            self._stream_listener = asyncio.create_task(self._listen_streams(consumer))

    async def stop(self) -> None:
        for listener in (self._listener, self._stream_listener):
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
        if self._stream_consumer is not None:
            await self._stream_consumer.stop()
        await self._consumer.stop()
        await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _listen(self) -> None:
        """Answers are keyed by request id: those of other clients' requests are not parsed."""
        async for message in self._consumer:
            if message.key is not None:
                request_id = message.key.decode(errors="replace")
                if request_id not in self._pending and request_id not in self._answered:
                    continue
            try:
                response = LLMResponse.model_validate_json(message.value or b"")
            except ValidationError:
                continue
            self._deliver(response)

    async def _listen_streams(self, consumer: AIOKafkaConsumer) -> None:
        """Chunks are keyed by request id: only those of this client's streams are parsed."""
        async for message in consumer:
            streamed = self._streams.get((message.key or b"").decode(errors="replace"))
            if streamed is None:
                continue
            try:
                chunk = StreamChunk.model_validate_json(message.value or b"")
            except ValidationError:
                continue
            if chunk.id == streamed.order.request_id:
                streamed.add(chunk)

    def _deliver(self, response: LLMResponse) -> None:
        if response.id in self._answered:
            self.duplicates += 1
            return
        future = self._pending.pop(response.id, None)
        if future is None:
            return
        self._answered[response.id] = None
        if len(self._answered) > REMEMBERED_ANSWERS:
            self._answered.popitem(last=False)
        if self.throttle is not None:
            overloaded = response.error is not None and response.error.code is ErrorCode.OVERLOADED
            self.throttle.answered(accepted=not overloaded)
        if not future.done():
            future.set_result(response)
        streamed = self._streams.get(response.id)
        if streamed is not None:
            streamed.wake()

    def expect(self, request_id: str) -> asyncio.Future[LLMResponse]:
        """A future for the response to `request_id`, for messages sent with `send_raw`."""
        future = self._pending.get(request_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[request_id] = future
        return future

    async def submit(self, request: LLMRequest) -> asyncio.Future[LLMResponse]:
        if request.reply_topic is None and self.reply_topic != self.settings.topics.responses.name:
            request.reply_topic = self.reply_topic
        future = self.expect(request.id)
        throttle = self.throttle
        refusable = request.priority is not Priority.HIGH
        if throttle is not None and not throttle.admit(refusable=refusable):
            self._deliver(throttled(request, throttle))
            return future
        await self.send_raw(dump(request), key=request.id.encode())
        return future

    async def call(self, request: LLMRequest, timeout: float = 60.0) -> LLMResponse:
        future = await self.submit(request)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            if self.throttle is not None:
                self.throttle.answered(accepted=False)
            raise
        finally:
            self._pending.pop(request.id, None)

    @contextlib.asynccontextmanager
    async def stream(self, request: LLMRequest, timeout: float = 60.0) -> AsyncIterator[Streamed]:
        """Send `request` with `stream` set; iterate the `Streamed` inside the block."""
        await self.start_streams()
        request.stream = True
        streamed = Streamed(request.id, self.expect(request.id), timeout)
        self._streams[request.id] = streamed
        try:
            future = await self.submit(request)
            if future.done() and refused_here(future.result()):
                streamed.end()  # it never reached Kafka, so no chunk of it will come
            yield streamed
        finally:
            self._streams.pop(request.id, None)
            self._pending.pop(request.id, None)

    async def cancel(self, request_id: str, reason: str = "cancelled by the caller") -> None:
        """Stop `request_id` wherever it is: it is answered `cancelled`, unless its answer
        was already on its way (then that one stands). Unknown ids are ignored."""
        event = CancelEvent(request_id=request_id, reason=reason)
        await self._producer.send_and_wait(
            self.settings.topics.cancel.name, dump(event), key=request_id.encode()
        )

    async def feedback(self, event: FeedbackEvent) -> None:
        """Say whether a request's answer was right or how good it was; the router learns
        from it (`agents.feedback`). Keyed by request id, as the routed records are."""
        await self._producer.send_and_wait(
            self.settings.topics.feedback.name, dump(event), key=event.request_id.encode()
        )

    async def send_raw(
        self, raw: bytes, key: bytes | None = None, timestamp_ms: int | None = None
    ) -> None:
        """Publish bytes to the requests topic as they are (bad-input tests use this too),
        stamped `timestamp_ms` if given, else now."""
        await self._producer.send_and_wait(
            self.settings.topics.requests.name, raw, key=key, timestamp_ms=timestamp_ms
        )

"""Client library: publish requests and await their responses by id.

The client reads its reply topic from the end, assigned rather than in a consumer group, so
any number of clients can share one topic. Under at-least-once delivery a request may be
answered twice; the client keeps the first answer and counts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from llmflow.admin import read_partitions
from schemas.messages import (
    CancelEvent,
    ChatMessage,
    FeedbackEvent,
    LLMRequest,
    LLMResponse,
    RequestStatus,
    Role,
    dump,
)
from streams.locality import kafka_partition
from topology.settings import Settings

REMEMBERED_ANSWERS = 100_000


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


class LLMFlowClient:
    def __init__(self, settings: Settings, reply_topic: str | None = None) -> None:
        self.settings = settings
        self.reply_topic = reply_topic or settings.topics.responses.name
        self.duplicates = 0
        self._pending: dict[str, asyncio.Future[LLMResponse]] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            enable_auto_commit=False,
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        )
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        try:
            partitions = await self._producer.partitions_for(self.reply_topic)
            assigned = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
            self._consumer.assign(assigned)
            await self._consumer.seek_to_end(*assigned)
            for tp in assigned:
                await self._consumer.position(tp)
        except BaseException:
            await self.stop()
            raise
        self._listener = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
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
        async for message in self._consumer:
            try:
                response = LLMResponse.model_validate_json(message.value or b"")
            except ValidationError:
                continue
            self._deliver(response)

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
        if not future.done():
            future.set_result(response)

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
        await self.send_raw(dump(request), key=request.id.encode())
        return future

    async def call(self, request: LLMRequest, timeout: float = 60.0) -> LLMResponse:
        future = await self.submit(request)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
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

    async def send_raw(self, raw: bytes, key: bytes | None = None) -> None:
        """Publish bytes to the requests topic as they are (bad-input tests use this too)."""
        await self._producer.send_and_wait(self.settings.topics.requests.name, raw, key=key)

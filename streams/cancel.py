"""Cancelled request ids, learnt by every worker from the cancel topic.

A cancelled request may be anywhere: in any stage's queue, in a batch, waiting as a
follower, streaming. So each worker reads every partition of the cancel topic itself,
assigned rather than in the workers' group, from the end: cancels sent before a worker
started are not seen by it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from aiokafka import TopicPartition
from pydantic import ValidationError

from schemas.messages import CancelEvent
from streams.watch import watcher
from topology.settings import Settings

log = logging.getLogger(__name__)
Listener = Callable[[CancelEvent], None]


class CancelledSet:
    """Ids cancelled in the last `remember_s`, at most `max_entries` of them; listeners
    hear of each new cancel as it comes (infer stops the call at once)."""

    def __init__(self, remember_s: float, max_entries: int) -> None:
        self.remember_s = remember_s
        self.max_entries = max_entries
        self._events: OrderedDict[str, tuple[float, CancelEvent]] = OrderedDict()
        self._listeners: list[Listener] = []

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._events

    def __len__(self) -> int:
        return len(self._events)

    def reason(self, request_id: str) -> str | None:
        """Why `request_id` was cancelled; None if it was not."""
        known = self._events.get(request_id)
        return known[1].reason if known is not None else None

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add(self, event: CancelEvent, now: float) -> None:
        """Remember `event` from `now` (this worker's clock, not the sender's)."""
        self._events[event.request_id] = (now, event)
        self._events.move_to_end(event.request_id)
        while self._events:
            since, _ = next(iter(self._events.values()))
            if len(self._events) <= self.max_entries and since >= now - self.remember_s:
                break
            self._events.popitem(last=False)
        for listener in self._listeners:
            listener(event)


async def watch_cancels(
    settings: Settings, cancelled: CancelledSet, clock: Callable[[], float]
) -> None:
    """Add every cancel published from now on to `cancelled`, until cancelled itself."""
    topic = settings.topics.cancel.name
    partitions = [TopicPartition(topic, p) for p in range(settings.topics.cancel.partitions)]
    async with watcher(settings, partitions) as consumer:
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        async for message in consumer:
            try:
                event = CancelEvent.model_validate_json(message.value or b"")
            except ValidationError:
                log.warning("a message on %s is not a cancel event", topic)
                continue
            cancelled.add(event, clock())

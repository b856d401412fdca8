"""Status: one record per request in flight, in a Table keyed by request id.

Stages are keyed differently, so they cannot write a Table keyed by request id (its
changelog goes to the partition of the event at hand). They report instead, on the
status topic keyed by request id, at three points only, each one message: preprocess
when a request is accepted, batch when its model call starts (the model, the retries
so far), respond when it is answered (status, error, the time spent in each stage). A
record is kept `keep_finished_s` after its answer, an unfinished one `max_age_s` after
it was last heard of, and at most `max_entries` per partition.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping
from typing import Any, cast

from faust.types import EventT, StreamT
from pydantic import ValidationError

from schemas.messages import RequestStatus, StatusEvent
from streams import metrics
from streams.app import Pipeline, raw_bytes
from streams.locality import kafka_partition
from topology.settings import StatusSettings

log = logging.getLogger(__name__)
STAGE = "status"
TABLE = "request-status"


def fold(record: RequestStatus | None, event: StatusEvent) -> RequestStatus:
    """`record` with `event` added. Reports come in any order (respond's may overtake
    batch's), so an answered request stays answered and the most retries counts."""
    record = record or RequestStatus(request_id=event.request_id)
    reached = dict(record.reached)
    reached[event.stage] = event.at
    update: dict[str, Any] = {
        "reached": reached,
        "model": record.model if record.status else event.model or record.model,
        "retries": max(record.retries, event.retries),
        "updated_at": max(record.updated_at, event.at),
    }
    if event.status is not None and record.status is None:
        update |= {
            "status": event.status,
            "error": event.error,
            "stage_latency_ms": event.stage_latency_ms,
            "finished_at": event.at,
            "model": event.model or record.model,
        }
    return record.model_copy(update=update)


class StatusBook:
    """The status records of this worker's partitions, and when each is dropped.

    Records are written and dropped only in events of their own partition. Each
    partition's keys are held in the order they were last written, so the oldest go
    first; the order is rebuilt from the Table the first time a partition is seen.
    """

    def __init__(
        self, records: MutableMapping[str, bytes], settings: StatusSettings, partitions: int
    ) -> None:
        self.records = records
        self.settings = settings
        self.partitions = partitions
        self._order: dict[int, OrderedDict[str, None]] = {}

    def get(self, request_id: str) -> RequestStatus | None:
        stored = self.records.get(request_id)
        return RequestStatus.model_validate_json(stored) if stored is not None else None

    def record(self, event: StatusEvent, partition: int, now: float) -> RequestStatus:
        order = self._partition(partition)
        record = fold(self.get(event.request_id), event)
        self.records[event.request_id] = record.model_dump_json().encode()
        order[event.request_id] = None
        order.move_to_end(event.request_id)
        self._expire(order, now)
        return record

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions this worker no longer owns: rebuilt if they come back."""
        for partition in partitions:
            self._order.pop(partition, None)

    def expired(self, record: RequestStatus, now: float) -> bool:
        if record.finished_at is not None:
            return now - record.finished_at >= self.settings.keep_finished_s
        return now - record.updated_at >= self.settings.max_age_s

    def _partition(self, partition: int) -> OrderedDict[str, None]:
        order = self._order.get(partition)
        if order is None:
            mine = [
                RequestStatus.model_validate_json(value)
                for key, value in self.records.items()
                if kafka_partition(key.encode(), self.partitions) == partition
            ]
            mine.sort(key=lambda r: r.updated_at)
            order = self._order[partition] = OrderedDict((r.request_id, None) for r in mine)
        return order

    def _expire(self, order: OrderedDict[str, None], now: float) -> None:
        """Drop the oldest while they are past their time or too many."""
        while order:
            oldest = next(iter(order))
            record = self.get(oldest)
            if record is not None and len(order) <= self.settings.max_entries:
                if not self.expired(record, now):
                    return
            order.popitem(last=False)
            if record is not None:
                del self.records[oldest]
                metrics.stage_events.labels(STAGE, "dropped").inc()


def attach(pipeline: Pipeline) -> None:
    spec = pipeline.settings.stage(STAGE)
    # Records are kept as their JSON, a third of the memory of the dicts it parses to;
    # the changelog carries the same bytes either way.
    records = pipeline.table(TABLE, raw=True)
    book = StatusBook(records, pipeline.settings.status, spec.topic.partitions)

    def revoked(_app: Any, revoked: set[Any], **_kwargs: Any) -> None:
        book.forget(tp.partition for tp in revoked if tp.topic == spec.topic.name)

    pipeline.app.on_partitions_revoked.connect(cast(Any, revoked))

    def record(event: EventT[bytes], report: StatusEvent) -> None:
        book.record(report, event.message.partition, time.time())

    pipeline.record_status_with(record)

    @pipeline.app.agent(pipeline.stage_topics[STAGE], name=STAGE)
    async def status(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                report = StatusEvent.model_validate_json(raw_bytes(event))
            except ValidationError:
                log.warning("a message on %s is not a status event", spec.topic.name)
                continue
            record(event, report)

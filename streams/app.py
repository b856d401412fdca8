"""The faust app and its wiring: topics from the stage graph, sends between stages, the DLQ.

Agents attach themselves to a `Pipeline`; they never name a topic or a key themselves.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import faust
from faust import streams as faust_streams
from faust.events import Event
from faust.types import TP, EventT, Message, StreamT, TableT, TopicT
from pydantic import ValidationError

from schemas.messages import DeadLetter, Envelope, ErrorCode, Status, StatusEvent, dump
from streams import metrics
from streams.backlog import HopBacklog
from streams.cache_store import CacheStore, open_cache_store
from streams.cancel import CancelledSet, watch_cancels
from streams.drivers import kafka_transport
from streams.locality import SemanticBucketer, bucketer_for, kafka_partition
from topology.settings import KeyBy, Settings, StageSpec, TopicSpec

MAX_REPLY_TOPICS = 1024
# Each hop under exactly-once waits for the sender's commit: Kafka Streams' 100 ms, not
# faust's 2.8 s.
EXACTLY_ONCE_COMMIT_INTERVAL_S = 0.1
log = logging.getLogger(__name__)
StageHandler = Callable[[EventT[bytes], Envelope], Awaitable[None]]
StatusRecorder = Callable[[EventT[bytes], StatusEvent], None]
Shared = TypeVar("Shared")
# The stage a handler runs for and the event it handles, for fused sends (`Pipeline.send`).
handling: ContextVar[tuple[str, EventT[bytes]] | None] = ContextVar("handling", default=None)


def raw_bytes(event: EventT[bytes]) -> bytes:
    """The message as sent; a tombstone (no value) reads as empty."""
    return event.value if isinstance(event.value, bytes) else b""


class LocalEvent(Event):
    """What a stage run in process by `Pipeline.send` handles: an event of its own topic and
    of the partition the request would have reached, so its Tables read and write that
    partition; `consumed` is the event read from Kafka, whose ack, transaction and dead
    letters it shares."""

    def __init__(self, handled: EventT[bytes], topic: str, partition: int) -> None:
        read = handled.message
        message = Message(
            topic,
            partition,
            read.offset,
            read.timestamp,
            read.timestamp_type,
            read.headers,
            read.key,
            read.value,
            read.checksum,
            generation_id=read.generation_id,
        )
        super().__init__(handled.app, handled.key, handled.value, handled.headers, message)
        self.consumed: EventT[bytes] = consumed(handled)


def consumed(event: EventT[bytes]) -> EventT[bytes]:
    """The event read from Kafka behind `event`."""
    return event.consumed if isinstance(event, LocalEvent) else event


@contextlib.contextmanager
def handling_locally(event: LocalEvent) -> Iterator[None]:
    """faust's Tables find their partition through faust's current event, which has no
    public setter; sends join the transaction of the event read from Kafka."""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        with kafka_transport.on_behalf_of(event.consumed):
            yield
    finally:
        faust_streams._current_event.reset(token)


def key_of(envelope: Envelope, key_by: KeyBy) -> bytes:
    request = envelope.request
    if key_by == "tenant":
        return request.tenant.encode()
    if key_by == "locality" and envelope.semantic_bucket is not None:
        return SemanticBucketer.key_of(envelope.semantic_bucket)
    if key_by in ("fingerprint", "locality"):
        return envelope.fingerprint.encode()
    if key_by == "model":
        return (envelope.model or "").encode()
    return request.id.encode()


def destination(
    spec: StageSpec, bucketer: SemanticBucketer, envelope: Envelope
) -> tuple[bytes, int | None]:
    """The key and, for an LSH bucket, the partition of `envelope` on `spec`'s topic.

    A bucket picks its partition itself (Kafka's hash of the key would scatter
    neighbouring buckets); every other key goes where the default partitioner puts it.
    """
    partition = None
    if spec.key_by == "locality" and envelope.semantic_bucket is not None:
        partition = bucketer.partition_of(envelope.semantic_bucket, spec.topic.partitions)
    return key_of(envelope, spec.key_by), partition


def partition_of(spec: StageSpec, bucketer: SemanticBucketer, envelope: Envelope) -> int:
    """The partition of `spec`'s topic that `envelope` lands on when sent there."""
    key, partition = destination(spec, bucketer, envelope)
    return kafka_partition(key, spec.topic.partitions) if partition is None else partition


class Pipeline:
    """One worker's view of the topology: the faust app, its topics and shared resources."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        scheme = kafka_transport.register(settings.consumer_fetch_max_wait_ms)
        exactly_once = settings.processing_guarantee == "exactly_once"
        self.app = faust.App(
            settings.app_id,
            broker=f"{scheme}://{settings.bootstrap_servers}",
            key_serializer="raw",
            value_serializer="raw",
            topic_partitions=settings.stages[0].topic.partitions,
            topic_replication_factor=settings.replication_factor,
            datadir=settings.data_dir,
            store=settings.table_store,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            processing_guarantee=settings.processing_guarantee,
            broker_session_timeout=settings.session_timeout_s,
            broker_commit_interval=EXACTLY_ONCE_COMMIT_INTERVAL_S if exactly_once else None,
            # Exactly-once: a rebalance first finishes and commits every event in flight,
            # since faust then seeks every partition it keeps back to its committed offset.
            stream_wait_empty=exactly_once,
            producer_linger=0.0,
        )
        self.stage_topics = {s.name: self._topic(s.topic) for s in settings.stages}
        self.requests_topic = self._topic(settings.topics.requests)
        self.dlq_topic = self._topic(settings.topics.dlq)
        self.stream_topic = self._topic(settings.topics.stream)
        self._reply_topics: dict[str, TopicT] = {}
        self._shared: dict[str, object] = {}
        self._handlers: dict[str, tuple[StageHandler, bool]] = {}
        self._status_recorder: StatusRecorder | None = None
        self.bucketer = bucketer_for(settings)
        # Hops are timed only where preprocess holds its intake on them.
        pause_at_ms = settings.limits.intake_pause_backlog_ms
        self.backlog = None if pause_at_ms is None else HopBacklog(pause_at_ms)
        self.cache_store: CacheStore = open_cache_store(
            settings.redis_url, settings.cache.max_entries_per_partition, settings.app_id
        )
        self.cancelled = CancelledSet(settings.cancel.remember_s, settings.cancel.max_remembered)
        # The partitions this worker owns, as of the last rebalance: fused sends reach only
        # these (faust's consumer builds a new set each time it is asked).
        self.owned: frozenset[TP] = frozenset()
        self.app.on_partitions_revoked.connect(cast(Any, self._revoked))
        self.app.on_partitions_assigned.connect(cast(Any, self._assigned))
        self.app.task(self._watch_cancels)
        self.sampler = metrics.worker_sampler()
        self.app.timer(settings.metrics_sample_s)(self._sample_metrics)

    def _revoked(self, _app: object, revoked: set[TP], **_kwargs: object) -> None:
        self.owned = self.owned - revoked

    def _assigned(self, _app: object, assigned: set[TP], **_kwargs: object) -> None:
        self.owned = frozenset(assigned)

    async def _watch_cancels(self) -> None:
        await watch_cancels(self.settings, self.cancelled, time.time)

    async def _sample_metrics(self) -> None:
        monitor = self.app.monitor
        assigned = self.app.consumer.assignment()
        self.sampler.sample(assigned, monitor.tp_end_offsets, monitor.tp_committed_offsets)

    def _topic(self, spec: TopicSpec) -> TopicT:
        return self.app.topic(
            spec.name,
            key_type=bytes,
            value_type=bytes,
            partitions=spec.partitions,
            config=spec.kafka_config(),
        )

    def table(self, name: str, raw: bool = False) -> TableT[str, Any]:
        """The Table `name` (JSON keys and values, or with `raw` values as the bytes given),
        co-partitioned with its stage's topic."""
        if name in self.app.tables:
            return cast(TableT[str, Any], self.app.tables[name])
        partitions = self.settings.stage(self.settings.tables[name]).topic.partitions
        return self.app.Table(
            name, partitions=partitions, key_type=str, value_type=bytes if raw else None
        )

    def shared(self, name: str, make: Callable[[], Shared]) -> Shared:
        """One object per worker for state that two stages share (a Table's index)."""
        if name not in self._shared:
            self._shared[name] = make()
        return cast(Shared, self._shared[name])

    def reply_topic(self, name: str | None) -> TopicT:
        name = name or self.settings.topics.responses.name
        topic = self._reply_topics.get(name)
        if topic is None:
            if len(self._reply_topics) >= MAX_REPLY_TOPICS:
                self._reply_topics.clear()
            topic = self.app.topic(name, key_type=bytes, value_type=bytes)
            self._reply_topics[name] = topic
        return topic

    async def envelopes(
        self, stream: StreamT[bytes], stage: str
    ) -> AsyncIterator[tuple[EventT[bytes], Envelope]]:
        """Events of an internal topic with their envelopes, timed for `stage`.

        An envelope that does not parse is dead-lettered; only a bug upstream makes one.
        """
        async for event in stream.events():
            try:
                envelope = Envelope.model_validate_json(raw_bytes(event))
            except ValidationError as exc:
                await self.dead_letter(event, "bad_envelope", str(exc), None)
                if not stream.enable_acks:
                    await stream.ack(event)
                continue
            hop_ms = self.mark(envelope, stage)
            if self.backlog is not None:
                self.backlog.observe(hop_ms, envelope.stage_entered_at)
            yield event, envelope

    def record_status_with(self, recorder: StatusRecorder) -> None:
        """How the status stage records a report, so `report` can record it in process
        when it fuses."""
        self._status_recorder = recorder

    def stage_agent(self, stage: str, handle: StageHandler, screen: bool = True) -> None:
        """Run `handle` on every envelope of `stage`'s topic as a faust agent.

        With `screen`, a request whose deadline has passed or that was cancelled is answered
        before `handle` sees it (stages that end requests answer every one). If `handle`
        raises, the request is answered `internal` and dead-lettered, and the agent goes on
        with the next one: one bad request never stalls a stage.
        """

        self.receive_fused(stage, handle, screen)

        async def agent(stream: StreamT[bytes]) -> None:
            async for event, envelope in self.envelopes(stream, stage):
                await self._enter(stage, event, envelope)

        self.app.agent(self.stage_topics[stage], name=stage)(agent)

    def receive_fused(self, stage: str, handle: StageHandler, screen: bool = True) -> None:
        """Let `send` run `handle` for `stage` in process where the sending stage fuses
        with it; `screen` as for `stage_agent`."""
        self._handlers[stage] = (handle, screen)

    def refuse_fused(self, stage: str, handle: StageHandler) -> None:
        """Every send to `stage` takes its topic again, unless a handler other than `handle`
        (a restarted agent's) has taken its place."""
        if self._handlers.get(stage, (None, True))[0] is handle:
            del self._handlers[stage]

    def hold(self, event: EventT[bytes]) -> None:
        """Keep the event read from Kafka behind `event` unacked past its own stream's ack,
        until `release`: a stage run in process that keeps its request after its handler
        returns (batch) must not let a crash before the answer lose the request."""
        consumed(event).message.incref()

    def release(self, event: EventT[bytes]) -> None:
        """Undo a `hold`; the last reference to let go acks the event read from Kafka."""
        message = consumed(event).message
        if message.ack(self.app.consumer):
            self.app.sensors.on_message_out(message.tp, message.offset, message)

    async def _enter(self, stage: str, event: EventT[bytes], envelope: Envelope) -> None:
        with handling_locally(event) if isinstance(event, LocalEvent) else contextlib.nullcontext():
            await self._handle(stage, event, envelope)

    async def _handle(self, stage: str, event: EventT[bytes], envelope: Envelope) -> None:
        handle, screen = self._handlers[stage]
        try:
            with self.handling(stage, event):
                if screen and await self.screen(envelope, stage):
                    return
                try:
                    await handle(event, envelope)
                except kafka_transport.PartitionRevoked:
                    raise
                except Exception as exc:
                    await self.handle_crash(event, envelope, stage, exc)
        except kafka_transport.PartitionRevoked as exc:
            log.info(
                "stage %s left request %s to its partition's new owner: %s",
                stage,
                envelope.request.id,
                exc,
            )

    @contextlib.contextmanager
    def handling(self, stage: str, event: EventT[bytes]) -> Iterator[None]:
        """Sends made inside are `stage`'s for `event`, so they may fuse (`send`)."""
        token = handling.set((stage, event))
        try:
            yield
        finally:
            handling.reset(token)

    async def handle_crash(
        self, event: EventT[bytes], envelope: Envelope, stage: str, exc: Exception
    ) -> None:
        log.exception("stage %s failed on request %s", stage, envelope.request.id)
        metrics.stage_events.labels(stage, "internal_error").inc()
        await self.dead_letter(event, "internal_error", f"{stage}: {exc!r}", envelope.request.id)
        error = envelope.result.error if envelope.result else None
        already_failed = error is not None and error.code is ErrorCode.INTERNAL
        if not already_failed:
            await self.fail(
                envelope,
                ErrorCode.INTERNAL,
                "internal_error",
                f"the {stage} stage failed on this request: {exc!r}",
            )

    def mark(self, envelope: Envelope, stage: str) -> float:
        """Time the hop into `stage` (`Envelope.mark`); returns it in ms."""
        hop_ms = envelope.mark(stage)
        metrics.stage_latency.labels(stage).observe(envelope.stage_latency_ms[stage] / 1e3)
        return hop_ms

    async def send(self, stage: str, envelope: Envelope, fuse: bool = True) -> None:
        """Hand `envelope` to `stage`, keyed as the stage graph says, or run `stage` on it
        here and now when the caller lets it (`fuse`) and `fused_event` finds the stage at
        hand fuses with it: that stage's Tables then write to the partition a hop would
        reach, and the event read from Kafka is acked only once every stage run for it is
        done (a crash replays them all)."""
        spec = self.settings.stage(stage)
        if fuse and stage in self._handlers:
            local = self.fused_event(spec, lambda: partition_of(spec, self.bucketer, envelope))
            if local is not None:
                # What a hop would deliver: the sender may still change its own copy.
                fused = Envelope.model_validate_json(dump(envelope))
                self.mark(fused, stage)
                await self._enter(stage, local, fused)
                return
        key, partition_or_none = destination(spec, self.bucketer, envelope)
        await self.stage_topics[stage].send(
            key=key, value=dump(envelope), partition=partition_or_none
        )

    def fused_event(self, spec: StageSpec, partition: Callable[[], int]) -> LocalEvent | None:
        """The event to run `spec`'s stage on in process, for a send to the `partition()`
        of its topic: when the stage at hand fuses with it (`Settings.fuses`) and this
        worker owns that partition; None when the send must take the topic."""
        current = handling.get()
        if current is None or not self.settings.fuses(current[0], spec.name):
            return None
        number = partition()
        if TP(spec.topic.name, number) not in self.owned:
            return None
        metrics.fused_sends.labels(current[0], spec.name).inc()
        return LocalEvent(current[1], spec.topic.name, number)

    async def fail(
        self,
        envelope: Envelope,
        code: ErrorCode,
        reason: str,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        """End a request early with an error response.

        Once a request has been through dedup it may lead followers, so it ends in
        postprocess, which releases them; before that it goes straight to respond.
        """
        envelope.fail(code, reason, message, retry_after_s)
        passed_dedup = "dedup" in envelope.stage_latency_ms
        await self.send("postprocess" if passed_dedup else "respond", envelope)

    async def screen(self, envelope: Envelope, stage: str) -> bool:
        """Answer a request that is past its deadline or cancelled; True if it was answered."""
        return await self.finish_if_cancelled(envelope, stage) or await self.finish_if_expired(
            envelope, stage
        )

    async def finish_if_cancelled(self, envelope: Envelope, stage: str) -> bool:
        """Answer `cancelled` when the request's id was cancelled; True if it was answered."""
        reason = self.cancelled.reason(envelope.request.id)
        if reason is None:
            return False
        metrics.stage_events.labels(stage, "cancelled").inc()
        await self.fail(
            envelope, ErrorCode.CANCELLED, "cancelled", f"{reason} (before the {stage} stage)"
        )
        return True

    async def report(self, envelope: Envelope, stage: str, status: Status | None = None) -> None:
        """Tell the request's status record that it reached `stage` (`agents.status`)."""
        if not self.settings.status.enabled:
            return
        result = envelope.result
        event = StatusEvent(
            request_id=envelope.request.id,
            stage=stage,
            model=(result.model if result else None) or envelope.model,
            retries=envelope.retries,
            status=status,
            error=result.error.code if result and result.error else None,
            stage_latency_ms=envelope.stage_latency_ms if status else {},
        )
        key = event.request_id.encode()
        if self._status_recorder is not None:
            spec = self.settings.stage("status")
            local = self.fused_event(spec, lambda: kafka_partition(key, spec.topic.partitions))
            if local is not None:
                with handling_locally(local):
                    self._status_recorder(local, event)
                return
        await self.stage_topics["status"].send(key=key, value=dump(event))

    async def finish_if_expired(self, envelope: Envelope, stage: str) -> bool:
        """Answer `timeout` when the request's deadline has passed; True if it was answered."""
        if not envelope.expired():
            return False
        metrics.stage_events.labels(stage, "timeout").inc()
        await self.fail(
            envelope,
            ErrorCode.TIMEOUT,
            "deadline_exceeded",
            f"deadline passed before the {stage} stage",
        )
        return True

    async def dead_letter(
        self, event: EventT[bytes], reason: str, message: str, request_id: str | None
    ) -> None:
        """Keep the raw bytes of the event read from Kafka and where they came from on the
        DLQ."""
        event = consumed(event)
        letter = DeadLetter(
            raw_b64=base64.b64encode(raw_bytes(event)).decode(),
            reason=reason,
            message=message,
            request_id=request_id,
            source_topic=event.message.topic,
            source_partition=event.message.partition,
            source_offset=event.message.offset,
        )
        metrics.dead_letters.labels(reason).inc()
        await self.dlq_topic.send(key=(request_id or "").encode() or None, value=dump(letter))

    def attach_agents(self) -> None:
        from agents import (
            batch,
            cache,
            dedup,
            feedback,
            learn,
            postprocess,
            preprocess,
            ratelimit,
            respond,
            route,
            status,
            warm,
        )

        stages = (
            preprocess,
            ratelimit,
            dedup,
            cache,
            route,
            batch,
            postprocess,
            respond,
            warm,
            status,
            feedback,
            learn,
        )
        for module in stages:
            if self.settings.runs(module.STAGE):
                module.attach(self)

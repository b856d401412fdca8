"""Message keys of the stage graph: which requests meet on one partition; fused sends."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import cast

from faust import current_event
from faust.events import Event
from faust.types import TP, EventT, Message, TopicT

from schemas.messages import (
    ChatMessage,
    DeadLetter,
    Envelope,
    LLMRequest,
    Role,
    Status,
    StatusEvent,
)
from streams.app import LocalEvent, Pipeline, key_of, partition_of
from streams.locality import SemanticBucketer, kafka_partition
from topology.settings import Fusion, Settings, StatusSettings


def envelope(bucket: int | None) -> Envelope:
    request = LLMRequest(
        id="r1", tenant="acme", messages=[ChatMessage(role=Role.USER, content="hi")]
    )
    return Envelope(request=request, fingerprint="f" * 64, semantic_bucket=bucket)


def test_locality_keys_by_the_lsh_bucket_when_there_is_one() -> None:
    assert key_of(envelope(3), "locality") == SemanticBucketer.key_of(3)
    assert key_of(envelope(3), "fingerprint") == b"f" * 64


def test_without_an_embedding_locality_falls_back_to_the_fingerprint() -> None:
    assert key_of(envelope(None), "locality") == b"f" * 64


def test_other_keys() -> None:
    assert key_of(envelope(3), "tenant") == b"acme"
    assert key_of(envelope(3), "request_id") == b"r1"


class Topic:
    """Stands in for a stage's faust topic: records what would have gone to Kafka."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, int | None, bytes]] = []

    async def send(self, key: bytes | None, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, partition, value))


@dataclass
class Handled:
    stage: str
    event: EventT[bytes]
    envelope: Envelope
    current: EventT[bytes] | None


def fused_pipeline(fusion: Fusion) -> tuple[Pipeline, list[Handled], Topic]:
    """A pipeline whose cache and route stages record what they are handed and faust's
    current event (what Tables go by); it owns every partition."""
    pipeline = Pipeline(Settings(fusion=fusion))
    seen: list[Handled] = []
    for stage in ("cache", "route"):

        async def handle(event: EventT[bytes], envelope: Envelope, stage: str = stage) -> None:
            seen.append(Handled(stage, event, envelope, current_event()))

        pipeline.stage_agent(stage, handle)
    topic = Topic()
    pipeline.stage_topics["cache"] = cast(TopicT, topic)
    pipeline.owned = frozenset(
        TP(s.topic.name, n) for s in pipeline.settings.stages for n in range(s.topic.partitions)
    )
    return pipeline, seen, topic


def consumed_event(pipeline: Pipeline, stage: str, partition: int) -> EventT[bytes]:
    settings = pipeline.settings
    topic = (
        settings.topics.requests.name if stage == "preprocess" else settings.stage(stage).topic.name
    )
    message = Message(topic, partition, 42, 1.0, 0, None, b"k", b"raw", None)
    return Event(pipeline.app, b"k", b"raw", None, message)


async def send_from(pipeline: Pipeline, stage: str, partition: int, sent: Envelope) -> None:
    with pipeline.handling(stage, consumed_event(pipeline, stage, partition)):
        await pipeline.send("cache", sent)


def cache_partition(pipeline: Pipeline, sent: Envelope) -> int:
    return partition_of(pipeline.settings.stage("cache"), pipeline.bucketer, sent)


def test_fusion_runs_the_next_stage_in_process_on_a_copy_of_its_own_partition() -> None:
    cases: tuple[tuple[Fusion, str], ...] = (
        ("key", "dedup"),
        ("local", "ratelimit"),
        ("local", "preprocess"),
    )
    for fusion, sender in cases:
        pipeline, seen, topic = fused_pipeline(fusion)
        sent = envelope(3)
        partition = cache_partition(pipeline, sent)
        asyncio.run(send_from(pipeline, sender, partition, sent))
        assert topic.sent == []
        [handled] = seen
        assert handled.stage == "cache" and handled.envelope is not sent
        assert handled.envelope.request == sent.request
        assert "cache" in handled.envelope.stage_latency_ms
        assert "cache" not in sent.stage_latency_ms
        # Tables go by the cache topic's partition; acks and dead letters by the event read.
        message = handled.event.message
        assert (message.topic, message.partition) == ("llm.stage.cache", partition)
        assert handled.current is handled.event
        assert isinstance(handled.event, LocalEvent)
        assert handled.event.consumed.message.offset == 42


def test_without_fusion_off_its_partition_or_key_or_not_owned_a_request_takes_the_topic() -> None:
    cases: tuple[tuple[Fusion, str, int], ...] = (
        ("off", "dedup", 0),
        ("key", "dedup", 1),
        ("key", "ratelimit", 0),
    )
    for fusion, sender, shift in cases:
        pipeline, seen, topic = fused_pipeline(fusion)
        sent = envelope(3)
        partitions = pipeline.settings.stage("cache").topic.partitions
        shifted = (cache_partition(pipeline, sent) + shift) % partitions
        if fusion == "key" and shift:
            pipeline.owned -= {TP("llm.stage.cache", cache_partition(pipeline, sent))}
        asyncio.run(send_from(pipeline, sender, shifted, sent))
        assert seen == [] and len(topic.sent) == 1
    pipeline, seen, topic = fused_pipeline("local")
    pipeline.owned = frozenset()
    asyncio.run(send_from(pipeline, "ratelimit", 0, envelope(3)))
    asyncio.run(pipeline.send("cache", envelope(3)))
    assert seen == [] and len(topic.sent) == 2


def test_a_sender_can_ask_for_the_hop() -> None:
    pipeline, seen, topic = fused_pipeline("local")

    async def unfused() -> None:
        with pipeline.handling("ratelimit", consumed_event(pipeline, "ratelimit", 0)):
            await pipeline.send("cache", envelope(3), fuse=False)

    asyncio.run(unfused())
    assert seen == [] and len(topic.sent) == 1


def test_owned_partitions_follow_rebalances() -> None:
    pipeline = Pipeline(Settings())
    kept, moved = TP("llm.stage.cache", 0), TP("llm.stage.cache", 1)
    pipeline._assigned(pipeline.app, {kept, moved})
    pipeline._revoked(pipeline.app, {moved})
    assert pipeline.owned == {kept}
    pipeline._assigned(pipeline.app, {moved})
    assert pipeline.owned == {moved}


def test_a_fused_stage_dead_letters_the_event_read_from_kafka() -> None:
    pipeline, _seen, _topic = fused_pipeline("local")
    dlq = Topic()
    pipeline.dlq_topic = cast(TopicT, dlq)
    read = consumed_event(pipeline, "ratelimit", 5)
    fused = LocalEvent(LocalEvent(read, "llm.stage.dedup", 2), "llm.stage.cache", 3)
    asyncio.run(pipeline.dead_letter(fused, "internal_error", "boom", "r1"))
    [(_key, _partition, value)] = dlq.sent
    letter = DeadLetter.model_validate_json(value)
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "llm.stage.ratelimit",
        5,
        42,
    )
    assert base64.b64decode(letter.raw_b64) == b"raw"


def test_a_stage_stops_taking_fused_sends_unless_a_new_handler_took_its_place() -> None:
    pipeline, seen, topic = fused_pipeline("local")
    sent = envelope(3)
    partition = cache_partition(pipeline, sent)

    async def stopped(_event: EventT[bytes], _envelope: Envelope) -> None:
        raise AssertionError("a stopped stage's handler ran")

    pipeline.refuse_fused("cache", stopped)  # an old agent's: the running one stays
    asyncio.run(send_from(pipeline, "route", partition, sent))
    assert len(seen) == 1 and topic.sent == []
    pipeline.receive_fused("cache", stopped)
    pipeline.refuse_fused("cache", stopped)
    asyncio.run(send_from(pipeline, "route", partition, sent))
    assert len(seen) == 1 and len(topic.sent) == 1


def test_a_held_event_read_from_kafka_is_acked_when_released_not_by_its_stream() -> None:
    pipeline, _seen, _topic = fused_pipeline("local")
    read = consumed_event(pipeline, "preprocess", 1)
    message = read.message
    message.incref()  # what faust's conductor does for the one stream reading it
    fused = LocalEvent(LocalEvent(read, "llm.stage.route", 2), "llm.stage.batch", 0)
    pipeline.hold(fused)
    assert not read.ack()  # the stream is done with it, the batch stage is not
    assert not message.acked
    pipeline.release(fused)
    assert message.acked and message.refcount == 0


def test_status_reports_go_out_unless_status_is_off() -> None:
    for enabled, reports in ((True, 1), (False, 0)):
        settings = Settings()
        pipeline = Pipeline(settings.model_copy(update={"status": StatusSettings(enabled=enabled)}))
        topic = Topic()
        pipeline.stage_topics["status"] = cast(TopicT, topic)
        asyncio.run(pipeline.report(envelope(3), "preprocess"))
        assert len(topic.sent) == reports


def test_a_fused_status_report_is_recorded_in_process_on_its_own_partition() -> None:
    pipeline, _seen, _topic = fused_pipeline("local")
    topic = Topic()
    pipeline.stage_topics["status"] = cast(TopicT, topic)
    recorded: list[tuple[EventT[bytes], StatusEvent, EventT[bytes] | None]] = []
    pipeline.record_status_with(
        lambda event, report: recorded.append((event, report, current_event()))
    )
    sent = envelope(3)

    async def report_from_respond() -> None:
        with pipeline.handling("respond", consumed_event(pipeline, "respond", 1)):
            await pipeline.report(sent, "respond", Status.OK)

    asyncio.run(report_from_respond())
    assert topic.sent == []
    [(event, report, current)] = recorded
    partitions = pipeline.settings.stage("status").topic.partitions
    assert (event.message.topic, event.message.partition) == (
        "llm.status",
        kafka_partition(b"r1", partitions),
    )
    assert current is event and isinstance(event, LocalEvent)
    assert (report.request_id, report.status) == ("r1", Status.OK)
    pipeline.owned = frozenset()
    asyncio.run(report_from_respond())
    asyncio.run(pipeline.report(sent, "preprocess"))
    assert len(recorded) == 1 and len(topic.sent) == 2

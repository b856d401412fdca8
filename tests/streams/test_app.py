"""Message keys of the stage graph: which requests meet on one partition; fused sends."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

from faust.types import EventT, TopicT

from schemas.messages import ChatMessage, Envelope, LLMRequest, Role
from streams.app import Pipeline, handling, key_of, partition_of
from streams.locality import SemanticBucketer
from topology.settings import Settings, StatusSettings


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
        self.sent: list[tuple[bytes, int | None]] = []

    async def send(self, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.sent.append((key, partition))


@dataclass
class Message:
    partition: int


@dataclass
class Event:
    message: Message


def fused_pipeline(fusion: bool) -> tuple[Pipeline, list[tuple[str, Envelope]], Topic]:
    """A pipeline whose cache and route stages record the envelopes they are handed."""
    pipeline = Pipeline(Settings(fusion=fusion))
    seen: list[tuple[str, Envelope]] = []
    for stage in ("cache", "route"):

        async def handle(_event: EventT[bytes], envelope: Envelope, stage: str = stage) -> None:
            seen.append((stage, envelope))

        pipeline.stage_agent(stage, handle)
    topic = Topic()
    pipeline.stage_topics["cache"] = cast(TopicT, topic)
    return pipeline, seen, topic


async def send_from(pipeline: Pipeline, stage: str, partition: int, sent: Envelope) -> None:
    token = handling.set((stage, cast(EventT[bytes], Event(Message(partition)))))
    try:
        await pipeline.send("cache", sent)
    finally:
        handling.reset(token)


def test_fusion_runs_the_next_stage_in_process_on_a_copy() -> None:
    pipeline, seen, topic = fused_pipeline(fusion=True)
    sent = envelope(3)
    partition = partition_of(pipeline.settings.stage("cache"), pipeline.bucketer, sent)
    asyncio.run(send_from(pipeline, "dedup", partition, sent))
    assert topic.sent == []
    [(stage, handed)] = seen
    assert stage == "cache" and handed is not sent and handed.request == sent.request
    assert "cache" in handed.stage_latency_ms and "cache" not in sent.stage_latency_ms


def test_without_fusion_or_off_its_partition_or_key_a_request_takes_the_topic() -> None:
    for fusion, sender, shift in ((False, "dedup", 0), (True, "dedup", 1), (True, "ratelimit", 0)):
        pipeline, seen, topic = fused_pipeline(fusion)
        sent = envelope(3)
        partition = partition_of(pipeline.settings.stage("cache"), pipeline.bucketer, sent)
        partitions = pipeline.settings.stage("cache").topic.partitions
        asyncio.run(send_from(pipeline, sender, (partition + shift) % partitions, sent))
        assert seen == [] and len(topic.sent) == 1
    pipeline, seen, topic = fused_pipeline(fusion=True)
    asyncio.run(pipeline.send("cache", envelope(3)))
    assert seen == [] and len(topic.sent) == 1


def test_status_reports_go_out_unless_status_is_off() -> None:
    for enabled, reports in ((True, 1), (False, 0)):
        settings = Settings()
        pipeline = Pipeline(settings.model_copy(update={"status": StatusSettings(enabled=enabled)}))
        topic = Topic()
        pipeline.stage_topics["status"] = cast(TopicT, topic)
        asyncio.run(pipeline.report(envelope(3), "preprocess"))
        assert len(topic.sent) == reports

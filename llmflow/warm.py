"""`llmflow warm`: fill the cache from the traffic the request and response topics hold.

Reads both topics from their start to their current end, pairs each request with the
model answer it got (`agents.warm.answered_pairs`), preprocesses the requests as the
pipeline does (fingerprint, and with the semantic layer on, embedding and LSH bucket) and
publishes them to the warm stage, which the workers store like postprocess does. Use it
after a cold start, or to seed a new deployment from an old one's topics.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition
from tqdm import tqdm

from agents.preprocess import InvalidRequest, Preprocessor, embed_last_user_turns, open_encoder
from agents.warm import STAGE, answered_pairs, warm_envelope
from llmflow.admin import read_partitions
from schemas.messages import Envelope, dump
from streams.app import destination
from streams.locality import bucketer_for
from topology.settings import Settings


async def read_topic(settings: Settings, topic: str, partitions: set[int]) -> list[bytes]:
    """Every value `topic` holds now in `partitions`, oldest first within each."""
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    records = await read_partitions(settings.bootstrap_servers, assigned)
    return [r.value for r in records if r.value is not None]


@dataclass
class WarmReport:
    requests: int = 0
    responses: int = 0
    answered: int = 0
    sent: int = 0
    invalid: int = 0


async def warm(
    settings: Settings, requests_topic: str, responses_topic: str, progress: bool = True
) -> WarmReport:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        requests, responses = [
            await read_topic(settings, topic, await producer.partitions_for(topic))
            for topic in (requests_topic, responses_topic)
        ]
        pairs = list(answered_pairs(requests, responses))
        report = WarmReport(len(requests), len(responses), len(pairs))
        preprocessor = Preprocessor(settings)
        encoder = open_encoder(settings) if settings.semantic.enabled else None
        bucketer = bucketer_for(settings)
        spec = settings.stage(STAGE)
        size = settings.embedding.max_batch
        with tqdm(total=len(pairs), desc="warming", unit="answer", disable=not progress) as bar:
            for start in range(0, len(pairs), size):
                envelopes: list[Envelope] = []
                for raw, response in pairs[start : start + size]:
                    try:
                        envelopes.append(warm_envelope(preprocessor.parse(raw), response))
                    except InvalidRequest:
                        report.invalid += 1
                if encoder is not None:
                    await embed_last_user_turns(encoder, bucketer, envelopes)
                for envelope in envelopes:
                    key, partition = destination(spec, bucketer, envelope)
                    await producer.send(
                        spec.topic.name, value=dump(envelope), key=key, partition=partition
                    )
                    report.sent += 1
                bar.update(min(size, len(pairs) - start))
        await producer.flush()
    finally:
        await producer.stop()
    return report


def run(settings: Settings, requests_topic: str, responses_topic: str) -> int:
    report = asyncio.run(warm(settings, requests_topic, responses_topic))
    print(
        f"read {report.requests} requests and {report.responses} responses from "
        f"{requests_topic} and {responses_topic}; {report.answered} had a model answer; "
        f"sent {report.sent} to the cache ({report.invalid} invalid requests skipped)"
    )
    return 0

"""Kafka administration: the topology's topics, the state of the workers' group, and
reading what partitions hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from topology.settings import Settings


async def create_topics(settings: Settings) -> list[str]:
    """Create what is missing; returns the names that were created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # Writes (acks=all) need all replicas in sync but one: a broker may die, none is lost.
        replicas = settings.replication_factor
        replicated = {"min.insync.replicas": str(replicas - 1)} if replicas > 2 else {}
        wanted = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.replication_factor,
                topic_configs={**spec.kafka_config(), **replicated},
            )
            for spec in settings.all_topics()
            if spec.name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def wait_for_stable_group(settings: Settings, members: int, timeout_s: float) -> None:
    """Block until the workers' consumer group is Stable with `members` members.

    Traffic sent during a rebalance is still answered, but a partition that moves mid-flight
    may be processed twice (at-least-once); tests that count exactly wait for this first.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    seen = "no description"
    try:
        while time.monotonic() < deadline:
            try:
                for response in await admin.describe_consumer_groups([settings.app_id]):
                    for (
                        _error,
                        _group,
                        state,
                        _ptype,
                        _protocol,
                        group_members,
                        *_,
                    ) in response.groups:
                        seen = f"{state} with {len(group_members)} members"
                        if state == "Stable" and len(group_members) == members:
                            return
            except KafkaError as exc:
                seen = repr(exc)
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    raise TimeoutError(f"group {settings.app_id!r} not stable with {members} members: {seen}")


async def read_partitions(
    bootstrap: str,
    partitions: list[TopicPartition],
    starts: dict[TopicPartition, int] | None = None,
    stops: dict[TopicPartition, int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record `partitions` hold now: from their start to their end offsets as they
    are when the read begins, oldest first within each partition. `starts` and `stops`
    narrow that to [start, stop) where given (a replay's range); `progress` is told how
    many records each fetch brought. The last fetch's batches are kept whole past the end
    offset: Tansu reports the end as one past the first record of the last batch."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        firsts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        stops = stops or {}
        for tp in partitions:
            ends[tp] = min(ends[tp], stops.get(tp, ends[tp]))
            consumer.seek(tp, max(firsts[tp], (starts or {}).get(tp, 0)))
        records: list[ConsumerRecord[bytes, bytes]] = []

        async def behind() -> bool:
            positions = [await consumer.position(tp) for tp in partitions]
            return any(at < ends[tp] for at, tp in zip(positions, partitions, strict=True))

        while await behind():
            batches = await consumer.getmany(*partitions, timeout_ms=1000)
            for tp, batch in batches.items():
                wanted = [r for r in batch if tp not in stops or r.offset < stops[tp]]
                records.extend(wanted)
                if progress is not None:
                    progress(len(wanted))
        return records
    finally:
        await consumer.stop()

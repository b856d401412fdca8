"""The consumer a worker follows a control topic with (cancels, router models), beside its
stages: assigned partitions, no group and no commits, polled at the watchers' own pace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition

from topology.settings import Settings


@asynccontextmanager
async def watcher(
    settings: Settings, partitions: list[TopicPartition]
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_wait_ms=settings.watcher_fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        yield consumer
    finally:
        await consumer.stop()

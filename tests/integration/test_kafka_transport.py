"""The worker's Kafka consumer, started against Tansu, waits for a fetch as long as it is
told to, and holds a fetch back no longer than 5 ms whatever that wait."""

from __future__ import annotations

import asyncio
from typing import cast

import faust
import pytest

from streams.drivers import kafka_transport

pytestmark = pytest.mark.integration


async def test_the_consumer_fetch_waits_as_told_and_holds_back_a_fetch_5_ms(
    tansu_bootstrap: str,
) -> None:
    scheme = kafka_transport.register(500)
    app = faust.App("test-kafka-transport", broker=f"{scheme}://{tansu_bootstrap}")
    thread = cast(kafka_transport.ShortWaitConsumer, app.consumer)._new_consumer_thread()
    thread.thread_loop = asyncio.get_running_loop()
    await thread.on_start()
    consumer = thread._consumer
    assert consumer is not None
    try:
        assert consumer._fetch_max_wait_ms == 500
        assert consumer._fetcher._prefetch_backoff == 0.005
    finally:
        await consumer.stop()

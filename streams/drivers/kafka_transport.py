"""faust's aiokafka transport with a short consumer fetch wait.

faust 0.15 hard-codes `fetch_max_wait_ms=1500`. Apache Kafka answers a waiting fetch as soon
as data arrives, but Tansu holds it for the full wait, so every hop would cost up to 1.5 s.
The wait is taken from `LLMFLOW_CONSUMER_FETCH_MAX_WAIT_MS` via the app's settings.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

SCHEME = "llmflow-kafka"
fetch_max_wait_ms = 5


class ShortWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer


class ShortWaitConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ShortWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = ShortWaitConsumer


def register(wait_ms: int) -> str:
    """Make `llmflow-kafka://` URLs resolve to this transport; returns the URL scheme."""
    global fetch_max_wait_ms
    fetch_max_wait_ms = wait_ms
    TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
    return SCHEME

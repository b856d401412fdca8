"""Real-process tests for the broker launchers: every test talks to a live server over TCP."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from llmflow.brokers import (
    KafkaBroker,
    RedisServer,
    TansuBroker,
    free_port,
    start_broker,
    wait_for_port,
)

TOPIC_VISIBLE_S = 10.0


def _pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (an exited child we have not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _roundtrip(bootstrap: str) -> None:
    """Produce one message and read it back with a fresh consumer group."""
    topic = f"llmflow-test-{uuid.uuid4().hex[:8]}"
    payload = uuid.uuid4().hex.encode()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, payload, key=b"k")
    finally:
        await producer.stop()
    assert meta.topic == topic

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=20_000, max_records=1)
        deadline = 6
        while not batches and deadline:
            batches = await consumer.getmany(timeout_ms=5_000, max_records=1)
            deadline -= 1
    finally:
        await consumer.stop()
    records = [r for rs in batches.values() for r in rs]
    assert [(r.key, r.value) for r in records] == [(b"k", payload)]


def test_free_port_and_wait_for_port() -> None:
    port = free_port()
    assert 0 < port < 65536
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen()
        wait_for_port("127.0.0.1", port, timeout=5)


def test_start_broker_names_the_embedded_tansu_or_apache_kafka() -> None:
    assert isinstance(start_broker("tansu"), TansuBroker)
    assert isinstance(start_broker("kafka"), KafkaBroker)
    with pytest.raises(ValueError, match="one of tansu, kafka"):
        start_broker("redpanda")


async def test_tansu_produce_consume() -> None:
    broker = TansuBroker()
    with broker:
        assert broker.bootstrap is not None
        assert broker.bootstrap.startswith("127.0.0.1:")
        pid = broker.pid
        assert pid is not None
        await _roundtrip(broker.bootstrap)
    assert broker.bootstrap is None
    assert not _pid_alive(pid)


@pytest.mark.skipif(not RedisServer.available(), reason="redis-server not installed")
async def test_redis_set_get() -> None:
    server = RedisServer()
    with server:
        assert server.url is not None
        assert server.url.startswith("redis://127.0.0.1:") and server.url.endswith("/0")
        pid = server.pid
        assert pid is not None
        client = aioredis.from_url(server.url)
        try:
            await client.set("llmflow:key", "value")
            assert await client.get("llmflow:key") == b"value"
            # Persistence must be off: nothing should ever be written to disk.
            assert await client.config_get("save") == {"save": ""}
        finally:
            await client.aclose()
    assert not _pid_alive(pid)


@pytest.mark.integration
async def test_kafka_produce_consume_and_admin(tmp_path: Path) -> None:
    broker = KafkaBroker(directory=tmp_path)
    with broker:
        assert broker.bootstrap is not None
        assert broker.bootstrap.startswith("127.0.0.1:")
        pid = broker.pid
        assert pid is not None and _pid_alive(pid)

        await _roundtrip(broker.bootstrap)

        topic = f"llmflow-admin-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
            # A created topic reaches the broker's metadata a moment after the controller
            # answers (KRaft), so it is looked for until a deadline.
            deadline = time.monotonic() + TOPIC_VISIBLE_S
            while topic not in (listed := await admin.list_topics()):
                assert time.monotonic() < deadline, f"{topic} not in {listed}"
                await asyncio.sleep(0.1)
            (described,) = await admin.describe_topics([topic])
            assert len(described["partitions"]) == 4
        finally:
            await admin.close()
    assert broker.bootstrap is None
    assert not _pid_alive(pid)

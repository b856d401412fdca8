"""RedisCacheStore against a real redis-server, and what an outage does to the cache stage:
every read is a miss and every write is skipped, both counted, and nothing raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from agents.cache import SemanticRecord, push_group, read_group, read_l2, write_l2
from llmflow.brokers import RedisServer, free_port
from schemas.messages import Result
from streams import metrics
from streams.app import Pipeline
from streams.drivers.redis_store import RedisCacheStore
from topology.settings import Settings


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url or ""


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisCacheStore]:
    opened = RedisCacheStore(redis_url)
    yield opened
    await opened.close()


async def test_values_expire(store: RedisCacheStore) -> None:
    await store.set("k", b"v", ttl_s=0.2)
    assert await store.get("k") == b"v"
    await asyncio.sleep(0.3)
    assert await store.get("k") is None


async def test_groups_keep_the_newest_values_first(store: RedisCacheStore) -> None:
    for value in (b"1", b"2", b"3"):
        await store.push("context:bucket", value, ttl_s=10.0, keep=2)
    assert await store.newest("context:bucket") == [b"3", b"2"]
    assert await store.newest("context:other") == []


async def test_namespaces_do_not_share_answers_or_groups(redis_url: str) -> None:
    live, shadow = RedisCacheStore(redis_url), RedisCacheStore(redis_url, "shadow-llmflow")
    try:
        await live.set("fingerprint", b"live answer", ttl_s=10.0)
        await live.push("context:bucket", b"live record", ttl_s=10.0, keep=4)
        assert await shadow.get("fingerprint") is None
        assert await shadow.newest("context:bucket") == []
        assert await live.get("fingerprint") == b"live answer"
    finally:
        await live.close()
        await shadow.close()


def test_a_namespaced_pipeline_keys_its_l2_by_its_own_app_id() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:6379/0")
    stores = [Pipeline(s).cache_store for s in (settings, settings.namespaced("shadow-"))]
    assert [store.key_prefix for store in stores if isinstance(store, RedisCacheStore)] == [
        "llmflow:cache:",
        "shadow-llmflow:cache:",
    ]


def faults(kind: str, fault: str) -> float:
    value: float = metrics.cache_faults.labels(kind, fault)._value.get()
    return value


async def test_a_redis_outage_degrades_to_counted_misses() -> None:
    pipeline = Pipeline(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    record = SemanticRecord(
        fingerprint="f", context="c", text="t", embedding="", expires_at=1e12, partition=0
    )
    before = {
        k: faults(*k)
        for k in [
            ("exact", "l2_read"),
            ("exact", "l2_write"),
            ("semantic", "l2_read"),
            ("semantic", "l2_write"),
        ]
    }
    assert await read_l2(pipeline, "k") is None
    await write_l2(pipeline, "k", Result(output="x"), expires_at=1e12)
    assert await read_group(pipeline, "c:0") == []
    await push_group(pipeline, "c:0", record, ttl_s=60.0)
    assert all(faults(*k) == v + 1 for k, v in before.items())
    await pipeline.cache_store.close()


async def test_an_unreadable_l2_value_is_a_counted_miss(redis_url: str) -> None:
    pipeline = Pipeline(Settings(redis_url=redis_url))
    await pipeline.cache_store.set("garbled", b"{not json", ttl_s=60.0)
    await pipeline.cache_store.push("c:garbled", b"[]", ttl_s=60.0, keep=4)
    before = faults("exact", "l2_unreadable"), faults("semantic", "l2_unreadable")
    assert await read_l2(pipeline, "garbled") is None
    assert await read_group(pipeline, "c:garbled") == []
    assert (faults("exact", "l2_unreadable"), faults("semantic", "l2_unreadable")) == (
        before[0] + 1,
        before[1] + 1,
    )
    await pipeline.cache_store.close()

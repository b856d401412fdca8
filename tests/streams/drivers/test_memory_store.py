"""MemoryCacheStore: expiry and the LRU bound, with a fake clock."""

from __future__ import annotations

import types

import pytest

from streams.drivers import memory_store
from streams.drivers.memory_store import MemoryCacheStore
from tests.clock import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(memory_store, "time", types.SimpleNamespace(time=fake))
    return fake


async def test_get_missing_is_none(clock: FakeClock) -> None:
    assert await MemoryCacheStore(2).get("k") is None


async def test_ttl_expiry(clock: FakeClock) -> None:
    store = MemoryCacheStore(10)
    await store.set("k", b"v", ttl_s=5.0)
    clock.now = 1004.9
    assert await store.get("k") == b"v"
    clock.now = 1005.0
    assert await store.get("k") is None
    clock.now = 1000.0
    assert await store.get("k") is None  # expired entries are removed, not hidden


async def test_set_overwrites_value_and_ttl(clock: FakeClock) -> None:
    store = MemoryCacheStore(10)
    await store.set("k", b"old", ttl_s=1.0)
    await store.set("k", b"new", ttl_s=100.0)
    clock.now = 1050.0
    assert await store.get("k") == b"new"


async def test_lru_bound(clock: FakeClock) -> None:
    store = MemoryCacheStore(2)
    await store.set("a", b"1", ttl_s=60)
    await store.set("b", b"2", ttl_s=60)
    assert await store.get("a") == b"1"  # a is now the most recent
    await store.set("c", b"3", ttl_s=60)
    assert await store.get("b") is None
    assert await store.get("a") == b"1"
    assert await store.get("c") == b"3"
    await store.set("d", b"4", ttl_s=60)
    assert await store.get("a") is None
    assert [await store.get(k) for k in "cd"] == [b"3", b"4"]


async def test_close_clears(clock: FakeClock) -> None:
    store = MemoryCacheStore(2)
    await store.set("a", b"1", ttl_s=60)
    await store.close()
    assert await store.get("a") is None


async def test_a_group_keeps_its_newest_values_first(clock: FakeClock) -> None:
    store = MemoryCacheStore(2)
    for value in (b"1", b"2", b"3"):
        await store.push("g", value, ttl_s=10.0, keep=2)
    assert await store.newest("g") == [b"3", b"2"]
    assert await store.newest("other") == []


async def test_a_group_expires_after_its_last_push(clock: FakeClock) -> None:
    store = MemoryCacheStore(2)
    await store.push("g", b"1", ttl_s=10.0, keep=2)
    clock.now += 9
    await store.push("g", b"2", ttl_s=10.0, keep=2)
    clock.now += 9
    assert await store.newest("g") == [b"2", b"1"]
    clock.now += 2
    assert await store.newest("g") == []

"""The L2 cache interface shared by all workers; drivers live in `streams.drivers`.

Two shapes: answers by key, and groups of the newest few records under one key (the
semantic layer's entries of one context and LSH bucket, which a worker scans itself).
"""

from __future__ import annotations

from typing import Protocol


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def push(self, group: str, value: bytes, ttl_s: float, keep: int) -> None:
        """Add `value` as the newest of `group`, which keeps its `keep` newest and
        expires `ttl_s` after its last push."""

    async def newest(self, group: str) -> list[bytes]:
        """The values of `group`, newest first."""

    async def close(self) -> None: ...


def open_cache_store(redis_url: str | None, max_entries: int, namespace: str) -> CacheStore:
    """Redis when configured (keys under `namespace`), else a bounded in-process store (the
    embedded default)."""
    if redis_url:
        from streams.drivers.redis_store import RedisCacheStore

        return RedisCacheStore(redis_url, namespace)
    from streams.drivers.memory_store import MemoryCacheStore

    return MemoryCacheStore(max_entries)

"""L2 cache in Redis: one store shared by every worker, expiry done by Redis itself."""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis

KEY_PREFIX = "llmflow:cache:"
GROUP_PREFIX = "llmflow:group:"


def _group_key(group: str) -> str:
    """Groups are named by long context keys: hash them to a short Redis key."""
    return GROUP_PREFIX + hashlib.sha256(group.encode()).hexdigest()[:40]


class RedisCacheStore:
    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(url)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(KEY_PREFIX + key)
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(KEY_PREFIX + key, value, px=_millis(ttl_s))

    async def push(self, group: str, value: bytes, ttl_s: float, keep: int) -> None:
        key = _group_key(group)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, value)
            pipe.ltrim(key, 0, keep - 1)
            pipe.pexpire(key, _millis(ttl_s))
            await pipe.execute()

    async def newest(self, group: str) -> list[bytes]:
        values = await self._redis.lrange(_group_key(group), 0, -1)
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def close(self) -> None:
        await self._redis.aclose()


def _millis(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))

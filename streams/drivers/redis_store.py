"""L2 cache in Redis: one store shared by every worker, expiry done by Redis itself."""

from __future__ import annotations

import redis.asyncio as aioredis

KEY_PREFIX = "llmflow:cache:"


class RedisCacheStore:
    def __init__(self, url: str) -> None:
        self._redis = aioredis.Redis.from_url(url)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(KEY_PREFIX + key)
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(KEY_PREFIX + key, value, px=max(1, int(ttl_s * 1000)))

    async def close(self) -> None:
        await self._redis.aclose()

"""L2 cache in Redis: one store shared by every worker, expiry done by Redis itself.

Keys start with the app id, so a shadow pipeline (`Settings.namespaced`) on the same Redis
is never served the live pipeline's answers."""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis


class RedisCacheStore:
    def __init__(self, url: str, namespace: str = "llmflow") -> None:
        self._redis = aioredis.Redis.from_url(url)
        self.key_prefix = f"{namespace}:cache:"
        self.group_prefix = f"{namespace}:group:"

    def _group_key(self, group: str) -> str:
        """Groups are named by long context keys: hash them to a short Redis key."""
        return self.group_prefix + hashlib.sha256(group.encode()).hexdigest()[:40]

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self.key_prefix + key)
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(self.key_prefix + key, value, px=_millis(ttl_s))

    async def push(self, group: str, value: bytes, ttl_s: float, keep: int) -> None:
        key = self._group_key(group)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, value)
            pipe.ltrim(key, 0, keep - 1)
            pipe.pexpire(key, _millis(ttl_s))
            await pipe.execute()

    async def newest(self, group: str) -> list[bytes]:
        values = await self._redis.lrange(self._group_key(group), 0, -1)
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def close(self) -> None:
        await self._redis.aclose()


def _millis(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))

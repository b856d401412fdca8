"""In-process L2 stand-in for when no Redis is configured: LRU-bounded, with expiry."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Generic, TypeVar

Value = TypeVar("Value")


class ExpiringLRU(Generic[Value]):
    """At most `max_entries` values, each gone after its own expiry time."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Value]] = OrderedDict()

    def get(self, key: str) -> Value | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= time.time():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: Value, ttl_s: float) -> None:
        self._entries[key] = (time.time() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class MemoryCacheStore:
    def __init__(self, max_entries: int) -> None:
        self._values: ExpiringLRU[bytes] = ExpiringLRU(max_entries)
        self._groups: ExpiringLRU[deque[bytes]] = ExpiringLRU(max_entries)

    async def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._values.put(key, value, ttl_s)

    async def push(self, group: str, value: bytes, ttl_s: float, keep: int) -> None:
        values = self._groups.get(group) or deque(maxlen=keep)
        values.appendleft(value)
        self._groups.put(group, values, ttl_s)

    async def newest(self, group: str) -> list[bytes]:
        return list(self._groups.get(group) or ())

    async def close(self) -> None:
        self._values.clear()
        self._groups.clear()

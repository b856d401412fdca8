"""How long requests lately queued between this worker's stages, so its intake can stop
taking new ones while the work it already took waits (see `Limits.intake_pause_backlog_ms`)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque

RECHECK_S = 0.005


class HopBacklog:
    """The median time of the hops this worker's stages took in the last `window_s`: what a
    request admitted now would queue for at each hop. No hop seen lately: nothing queues
    (a worker whose later stages run elsewhere never holds its intake back)."""

    def __init__(self, limit_ms: float, window_s: float = 1.0, max_samples: int = 1024) -> None:
        self.limit_ms = limit_ms
        self.window_s = window_s
        self._hops: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def observe(self, waited_ms: float, now: float) -> None:
        self._hops.append((now, waited_ms))

    def level_ms(self, now: float) -> float:
        while self._hops and self._hops[0][0] < now - self.window_s:
            self._hops.popleft()
        if not self._hops:
            return 0.0
        return statistics.median(waited for _, waited in self._hops)

    async def wait_until_below(self) -> bool:
        """Wait while the level is over `limit_ms`; True if it was. The level is a median
        over a sliding window, so it is looked at again rather than waited on."""
        held = False
        while self.level_ms(time.time()) > self.limit_ms:
            held = True
            await asyncio.sleep(RECHECK_S)
        return held

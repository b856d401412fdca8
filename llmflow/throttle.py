"""Client-side adaptive throttling (Google SRE book, "Handling Overload").

A worker out of capacity answers `overloaded`, but reading and refusing each request still
costs it a Kafka read and a reply. Each client counts, over the last `window_s`, its
requests that were answered (a refusal of its own included) and those the pipeline
accepted (answered with anything but `overloaded`), and refuses a new request itself with
probability max(0, (requests - k * accepts) / (requests + 1)). So a client sends about `k`
times what the pipeline accepts: enough to notice when capacity comes back, and the worker
spends the rest of its capacity on requests it admits, not on refusals. As in Envoy's
admission control, a client with fewer than `min_requests` answers in the window refuses
nothing (a few `overloaded` answers, such as a cold worker's first, say little), and the
probability is capped at `max_probability`, so at least that share of the offered requests
always goes and sees capacity return: a client sends the larger of k times the accepted
and (1 - max_probability) times the offered rate. A request counts once answered (a
caller's own timeout counts as not accepted), not when sent: a burst still in flight is no
sign of overload. High priority is never refused here, as preprocess never sheds it.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable


class AdaptiveThrottle:
    """One client's counts over the last `window_s`, by whole second, and its decision."""

    def __init__(
        self,
        k: float,
        window_s: float,
        min_requests: int,
        max_probability: float,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.k = k
        self.window_s = window_s
        self.min_requests = min_requests
        self.max_probability = max_probability
        self._clock = clock
        self._draw = draw
        # One [second, requests, accepts] per second asked about, oldest first.
        self._seconds: deque[list[int]] = deque()
        self._requests = 0
        self._accepts = 0

    def _current(self) -> list[int]:
        second = int(self._clock())
        while self._seconds and self._seconds[0][0] <= second - self.window_s:
            _, requests, accepts = self._seconds.popleft()
            self._requests -= requests
            self._accepts -= accepts
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
        return self._seconds[-1]

    def refusal_probability(self) -> float:
        """The chance that the next refusable request is refused."""
        self._current()
        if self._requests < self.min_requests:
            return 0.0
        excess = (self._requests - self.k * self._accepts) / (self._requests + 1)
        return min(self.max_probability, max(0.0, excess))

    def admit(self, refusable: bool = True) -> bool:
        """Whether to send a request; one refused must still be counted (`answered`)."""
        probability = self.refusal_probability()
        return not (refusable and probability > 0.0 and self._draw() < probability)

    def answered(self, accepted: bool) -> None:
        """Count one request's answer: accepted unless it was `overloaded`."""
        second = self._current()
        second[1] += 1
        self._requests += 1
        if accepted:
            second[2] += 1
            self._accepts += 1

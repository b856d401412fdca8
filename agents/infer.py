"""Infer: call the chosen model for each request of a batch, with timeouts and retries.

It runs fused inside the batch agent: both are keyed by model, so a Kafka hop between them
would buy nothing. Backends (the OpenAI-compatible HTTP one today) live in
`streams.drivers`; this module decides how long to wait, when to retry and what failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from schemas.messages import Envelope, ErrorCode, Result, Status, StreamChunk
from streams import metrics
from topology.settings import InferSettings, ModelSpec, Settings

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """A call that failed; `code` is `invalid` when the model cannot take this request at
    all (so retrying or blaming the upstream would be wrong)."""

    def __init__(
        self,
        reason: str,
        message: str,
        retryable: bool,
        retry_after_s: float | None = None,
        code: ErrorCode = ErrorCode.UPSTREAM_ERROR,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.code = code


Delta = Callable[[str], Awaitable[None]]
ChunkSink = Callable[[StreamChunk], Awaitable[None]]


class ChatBackend(Protocol):
    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        """One call; raises UpstreamError or asyncio.TimeoutError. When `on_delta` is given
        the answer's text is passed to it piece by piece as it is generated."""
        ...

    async def close(self) -> None: ...


def backoff_delay(attempt: int, settings: InferSettings, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2**attempt))
    return rng.uniform(0.0, ceiling)


class StreamedChunks:
    """Sends a request's deltas as numbered stream chunks and counts them."""

    def __init__(self, request_id: str, sink: ChunkSink) -> None:
        self.request_id = request_id
        self.sink = sink
        self.sent = 0

    async def __call__(self, delta: str) -> None:
        """The index is taken before the send: were the request to time out while a
        chunk is on its way, the final chunk's index must still come after it."""
        index = self.sent
        self.sent += 1
        await self.sink(StreamChunk(id=self.request_id, index=index, delta=delta))


class InferenceRunner:
    def __init__(
        self,
        settings: Settings,
        backend: ChatBackend,
        chunks: ChunkSink | None = None,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.chunks = chunks
        self.rng = random.Random(seed)
        self.slots = asyncio.Semaphore(settings.infer.max_concurrency)

    async def run(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Answer every envelope of a batch: each gets a result or an error, never nothing."""
        await asyncio.gather(*(self._answer(e) for e in envelopes))
        return envelopes

    async def _answer(self, envelope: Envelope) -> None:
        spec = self.settings.model(envelope.model or "")
        if spec is None:
            envelope.fail(ErrorCode.INVALID, "unknown_model", f"no model {envelope.model!r}")
            return
        stream = None
        if envelope.request.stream and self.chunks is not None:
            stream = StreamedChunks(envelope.request.id, self.chunks)
        await self._answer_from(spec, envelope, stream)
        if stream is not None and envelope.result is not None:
            envelope.result.streamed_chunks = stream.sent

    async def _answer_from(
        self, spec: ModelSpec, envelope: Envelope, stream: StreamedChunks | None
    ) -> None:
        budget = self.settings.infer.timeout_s
        if envelope.request.deadline is not None:
            budget = min(budget, envelope.request.deadline - time.time())
        try:
            result = await asyncio.wait_for(self._call(spec, envelope, stream), budget)
        except TimeoutError:
            metrics.upstream_calls.labels(spec.name, "timeout").inc()
            envelope.fail(
                ErrorCode.TIMEOUT,
                "upstream_timeout",
                f"{spec.name} did not answer within {max(budget, 0):.3f}s",
            )
            return
        except UpstreamError as exc:
            envelope.fail(exc.code, exc.reason, exc.message, exc.retry_after_s)
            return
        except Exception as exc:
            # A backend bug must cost this request an error answer, not the whole batch.
            log.exception("backend for %s failed", spec.name)
            envelope.fail(ErrorCode.UPSTREAM_ERROR, "backend_failure", repr(exc))
            return
        envelope.result = result
        envelope.status = Status.OK

    async def _call(
        self, spec: ModelSpec, envelope: Envelope, stream: StreamedChunks | None
    ) -> Result:
        """Waiting for a slot counts against the request's time budget too."""
        async with self.slots:
            return await self._with_retries(spec, envelope, stream)

    async def _with_retries(
        self, spec: ModelSpec, envelope: Envelope, stream: StreamedChunks | None
    ) -> Result:
        """A call that already streamed part of its answer is not retried: the caller has
        those chunks, and a second answer would not continue them."""
        retries = self.settings.infer.retries
        for attempt in range(retries + 1):
            try:
                result = await self.backend.complete(spec, envelope, stream)
            except UpstreamError as exc:
                metrics.upstream_calls.labels(spec.name, exc.reason).inc()
                streamed = stream is not None and stream.sent > 0
                if not exc.retryable or attempt == retries or streamed:
                    raise
                delay = backoff_delay(attempt, self.settings.infer, self.rng)
                await asyncio.sleep(max(delay, exc.retry_after_s or 0.0))
                continue
            metrics.upstream_calls.labels(spec.name, "ok").inc()
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

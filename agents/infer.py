"""Infer: call the chosen model for each request of a batch, and survive its failures.

It runs fused inside the batch agent: both are keyed by model, so a Kafka hop between them
would buy nothing. Backends (OpenAI-compatible HTTP, local ONNX decoders) live in
`streams.drivers`; this module decides how long to wait, when to retry, when to stop
calling a deployment (`agents.breaker`), which model stands in (`agents.failover`), and
what failed. A request's answer comes from, in order: the routed model, the models of its
fallback chain, then, marked degraded, a cached answer or a cheaper model's. A request
routed as an ensemble gets several sampled answers, each by that path, combined by vote.
A cancelled request's call is stopped where it is, which frees its slot and its connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from agents.breaker import Breakers, BreakerState, Outcome
from agents.ensemble import ENSEMBLE, combine, sample
from agents.failover import Budget, cheaper_substitute, fallback_chain, time_budget
from schemas.messages import Envelope, ErrorCode, Result, Status, StreamChunk
from streams import metrics
from streams.cancel import CancelledSet
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


CachedAnswer = Callable[[Envelope], Awaitable[Result | None]]
STATE_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def count_transition(model: str, state: BreakerState) -> None:
    metrics.circuit_state.labels(model).set(STATE_GAUGE[state])
    metrics.circuit_transitions.labels(model, state.value).inc()
    log.warning("circuit of %s is now %s", model, state.value)


def streamed(stream: StreamedChunks | None) -> bool:
    """Whether the caller already has part of an answer: no other answer may follow it."""
    return stream is not None and stream.sent > 0


@dataclass(frozen=True)
class TimeLeft:
    """One request's time budget, ending at `ends_at` on the event loop's clock."""

    budget: Budget
    ends_at: float

    def seconds(self) -> float:
        return self.ends_at - asyncio.get_running_loop().time()

    def call_timeout(self) -> float | None:
        """A call's own timeout, when it ends before the request's; else None, and the
        request's own timeout cancels the call (which says nothing of the deployment)."""
        share = self.budget.attempt_s
        return share if share < self.seconds() else None


class InferenceRunner:
    """Answers batches; holds this worker's breakers, so it lives as long as the worker."""

    def __init__(
        self,
        settings: Settings,
        backend: ChatBackend,
        chunks: ChunkSink | None = None,
        seed: int | None = None,
        cached: CachedAnswer | None = None,
        clock: Callable[[], float] = time.monotonic,
        cancelled: CancelledSet | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.chunks = chunks
        self.cached = cached
        self.rng = random.Random(seed)
        self.slots = asyncio.Semaphore(settings.infer.max_concurrency)
        self.breakers = Breakers(settings.infer.breaker, clock, count_transition)
        self.cancelled = cancelled
        self._calls: dict[str, asyncio.Future[Result]] = {}
        if cancelled is not None:
            cancelled.listen(lambda event: self._stop(event.request_id))

    def _stop(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            call.cancel()

    def _cancel_reason(self, request_id: str) -> str | None:
        return self.cancelled.reason(request_id) if self.cancelled is not None else None

    async def run(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Answer every envelope of a batch: each gets a result or an error, never nothing."""
        await asyncio.gather(*(self._answer(e) for e in envelopes))
        return envelopes

    async def _answer(self, envelope: Envelope) -> None:
        spec = self.settings.model(envelope.model or "")
        if spec is None:
            envelope.fail(ErrorCode.INVALID, "unknown_model", f"no model {envelope.model!r}")
            return
        reason = self._cancel_reason(envelope.request.id)
        if reason is not None:
            envelope.fail(ErrorCode.CANCELLED, "cancelled", f"{reason} (while batched)")
            return
        stream = None
        if envelope.request.stream and self.chunks is not None:
            stream = StreamedChunks(envelope.request.id, self.chunks)
        with metrics.in_upstream(envelope):
            await self._answer_from(spec, envelope, stream)
        if stream is not None and envelope.result is not None:
            envelope.result.streamed_chunks = stream.sent

    async def _answer_from(
        self, spec: ModelSpec, envelope: Envelope, stream: StreamedChunks | None
    ) -> None:
        budget = time_budget(self.settings.infer, envelope.request, time.time())
        request_id = envelope.request.id
        call = asyncio.ensure_future(self._call(spec, envelope, stream, budget))
        self._calls[request_id] = call
        try:
            result = await asyncio.wait_for(call, budget.total_s)
        except asyncio.CancelledError:
            reason = self._cancel_reason(request_id)
            if reason is None or self._stopping():
                raise
            metrics.upstream_calls.labels(spec.name, "cancelled").inc()
            envelope.fail(ErrorCode.CANCELLED, "cancelled", f"{reason} (during its model call)")
            return
        except TimeoutError:
            metrics.upstream_calls.labels(spec.name, "timeout").inc()
            envelope.fail(
                ErrorCode.TIMEOUT,
                "upstream_timeout",
                f"{spec.name} did not answer within {budget.total_s:.3f}s",
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
        finally:
            if self._calls.get(request_id) is call:
                del self._calls[request_id]
        envelope.result = result
        envelope.status = Status.CACHED if result.degraded == "cache" else Status.OK

    @staticmethod
    def _stopping() -> bool:
        """Whether this task itself is being cancelled (the worker stops), not its call."""
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _call(
        self, spec: ModelSpec, envelope: Envelope, stream: StreamedChunks | None, budget: Budget
    ) -> Result:
        """Waiting for a slot counts against the request's time budget too."""
        time_left = TimeLeft(budget, asyncio.get_running_loop().time() + budget.total_s)
        async with self.slots:
            if envelope.route_reason == ENSEMBLE:
                return await self._ensemble(spec, envelope, time_left)
            return await self._failover(spec, envelope, stream, time_left)

    async def _ensemble(self, spec: ModelSpec, envelope: Envelope, time_left: TimeLeft) -> Result:
        """`route.ensemble_samples` sampled answers at once, so a local decoder batches
        them; the samples that failed are left out of the vote, and all failing fails it."""
        route = self.settings.route
        samples = [
            sample(envelope, index, route.ensemble_temperature)
            for index in range(route.ensemble_samples)
        ]
        answers = await asyncio.gather(
            *(self._failover(spec, s, None, time_left) for s in samples), return_exceptions=True
        )
        envelope.retries += sum(s.retries for s in samples)
        results = [a for a in answers if isinstance(a, Result)]
        if not results:
            raise next(a for a in answers if isinstance(a, BaseException))
        return combine(results)

    async def _failover(
        self,
        routed: ModelSpec,
        envelope: Envelope,
        stream: StreamedChunks | None,
        time_left: TimeLeft,
    ) -> Result:
        """The routed model, then its fallbacks, then a degraded answer; a failure after
        part of the answer was streamed ends it there."""
        failure: UpstreamError | None = None
        tried: list[str] = []
        for spec in fallback_chain(self.settings, routed):
            try:
                return await self._with_retries(spec, envelope, stream, time_left)
            except UpstreamError as exc:
                if streamed(stream):
                    raise
                failure = exc
                tried.append(spec.name)
                metrics.fallbacks.labels(spec.name, exc.reason).inc()
        assert failure is not None, "a chain holds the routed model at least"
        if not self.settings.infer.degrade:
            raise failure
        return await self._degraded(routed, envelope, stream, time_left, tried, failure)

    async def _degraded(
        self,
        routed: ModelSpec,
        envelope: Envelope,
        stream: StreamedChunks | None,
        time_left: TimeLeft,
        tried: list[str],
        failure: UpstreamError,
    ) -> Result:
        """A cached answer if the request may read the cache, else a cheaper model's."""
        if self.cached is not None and envelope.request.cache.read:
            result = await self.cached(envelope)
            if result is not None:
                metrics.degraded_answers.labels("cache").inc()
                result.degraded = "cache"
                return result
        substitute = cheaper_substitute(
            self.settings, routed, envelope, tried, lambda m: self.breakers.of(m).would_allow()
        )
        if substitute is None:
            raise failure
        result = await self._with_retries(substitute, envelope, stream, time_left)
        metrics.degraded_answers.labels("cheaper_model").inc()
        result.degraded = "cheaper_model"
        return result

    async def _with_retries(
        self,
        spec: ModelSpec,
        envelope: Envelope,
        stream: StreamedChunks | None,
        time_left: TimeLeft,
    ) -> Result:
        """Retries with backoff, never sooner than the upstream's Retry-After, and not at
        all when that would be after the request's time is up: the next model may answer
        in time. A call that already streamed part of its answer is not retried: the
        caller has those chunks, and a second answer would not continue them."""
        infer = self.settings.infer
        for attempt in range(infer.retries + 1):
            try:
                return await self._attempt(spec, envelope, stream, time_left)
            except UpstreamError as exc:
                if not exc.retryable or attempt == infer.retries or streamed(stream):
                    raise
                delay = max(backoff_delay(attempt, infer, self.rng), exc.retry_after_s or 0.0)
                if delay >= time_left.seconds():
                    raise
                envelope.retries += 1
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(
        self,
        spec: ModelSpec,
        envelope: Envelope,
        stream: StreamedChunks | None,
        time_left: TimeLeft,
    ) -> Result:
        """One call through the deployment's breaker, which learns its outcome: retryable
        errors and timeouts count against the deployment, a refused request does not."""
        breaker = self.breakers.of(spec.name)
        permit = breaker.allow()
        if permit is None:
            metrics.upstream_calls.labels(spec.name, "circuit_open").inc()
            raise UpstreamError("circuit_open", f"{spec.name}'s circuit is open", retryable=False)
        timeout = time_left.call_timeout()
        outcome = Outcome.ABANDONED
        try:
            with metrics.upstream_call(spec.name):
                call = self.backend.complete(spec, envelope, stream)
                result = await asyncio.wait_for(call, timeout)
            outcome = Outcome.SUCCESS
        except TimeoutError as exc:
            outcome = Outcome.FAILURE
            metrics.upstream_calls.labels(spec.name, "timeout").inc()
            raise UpstreamError(
                "attempt_timeout",
                f"{spec.name} did not answer within {timeout or 0.0:.3f}s",
                retryable=True,
                code=ErrorCode.TIMEOUT,
            ) from exc
        except UpstreamError as exc:
            outcome = Outcome.FAILURE if exc.retryable else Outcome.ABANDONED
            metrics.upstream_calls.labels(spec.name, exc.reason).inc()
            raise
        finally:
            breaker.record(permit, outcome)
        metrics.upstream_calls.labels(spec.name, "ok").inc()
        metrics.count_usage(spec.name, envelope.request.tenant, result)
        return result

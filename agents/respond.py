"""Respond: publish the one terminal response of a request, where its caller listens.

Responses are keyed by request id. Under at-least-once delivery a redelivered request may be
answered twice; both answers carry its id and the client keeps the first.
"""

from __future__ import annotations

import time

from faust.types import EventT

from schemas.messages import Envelope, ErrorCode, ErrorInfo, LLMResponse, Status, StreamChunk, dump
from streams import metrics
from streams.app import Pipeline

STAGE = "respond"


def build_response(envelope: Envelope, now: float) -> LLMResponse:
    result = envelope.result
    status = envelope.status or Status.ERROR
    error = result.error if result is not None else None
    if status == Status.ERROR and error is None:
        error = ErrorInfo(
            code=ErrorCode.UPSTREAM_ERROR,
            reason="no_result",
            message="the request ended without an answer",
        )
    response = LLMResponse(
        id=envelope.request.id,
        tenant=envelope.request.tenant,
        status=status,
        model=envelope.model,
        merged_with=envelope.merged_with,
        merge_kind=envelope.merge_kind,
        latency_ms=round((now - envelope.received_at) * 1000.0, 3),
        upstream_ms=round(envelope.upstream_ms, 3),
        stage_latency_ms={k: round(v, 3) for k, v in envelope.stage_latency_ms.items()},
        error=error,
    )
    if result is not None and error is None:
        response.output = result.output
        response.finish_reason = result.finish_reason
        response.model = result.model or envelope.model
        response.usage = result.usage
        response.degraded = result.degraded
        if result.cache_tier is not None:
            response.cache_kind = result.cache_kind or "exact"
            response.cache_tier = result.cache_tier
        # Only the call that reached a model costs money; cache hits and merges are free.
        response.cost_usd = result.cost_usd if status == Status.OK else 0.0
    return response


def stream_chunks(response: LLMResponse, already_sent: int = 0) -> list[StreamChunk]:
    """The rest of a streamed answer, ending with a `done` chunk (an error one if it failed).

    When the model streamed its answer as it generated it, only the `done` chunk is left;
    otherwise (cached, merged, or a model that did not stream) the answer goes as words.
    """
    if already_sent or response.error is not None:
        words = []
    else:
        words = (response.output or "").split(" ")
    chunks = [
        StreamChunk(id=response.id, index=i, delta=w if i == 0 else " " + w)
        for i, w in enumerate(words)
    ]
    done_index = already_sent + len(words)
    chunks.append(
        StreamChunk(id=response.id, index=done_index, delta="", done=True, error=response.error)
    )
    return chunks


def chunks_sent_by_infer(envelope: Envelope) -> int:
    """Only the request that called the model had its own chunks streamed (a stream broken
    by an error included); a follower or a cache hit carries a copy of that result, not
    its chunks."""
    result = envelope.result
    if result is None or envelope.merged_with is not None or envelope.status is Status.CACHED:
        return 0
    return result.streamed_chunks


def attach(pipeline: Pipeline) -> None:
    async def respond(_event: EventT[bytes], envelope: Envelope) -> None:
        response = build_response(envelope, time.time())
        key = response.id.encode()
        if envelope.request.stream:
            for chunk in stream_chunks(response, chunks_sent_by_infer(envelope)):
                await pipeline.stream_topic.send(key=key, value=dump(chunk))
        code = response.error.code.value if response.error else ""
        metrics.responses.labels(response.status.value, code).inc()
        metrics.request_latency.labels(response.status.value).observe(response.latency_ms / 1000.0)
        metrics.observe_overhead(envelope, response.latency_ms / 1000.0)
        await pipeline.reply_topic(envelope.request.reply_topic).send(key=key, value=dump(response))
        await pipeline.report(envelope, STAGE, response.status)

    pipeline.stage_agent(STAGE, respond, screen=False)

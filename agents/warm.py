"""Warm: fill the cache from earlier traffic, replayed from the request and response topics.

`llmflow warm` pairs each answered request with its model answer (`answered_pairs`) and
sends them here, keyed like the cache stage, so each entry lands in the Tables and the
semantic index of the partition that will look it up. Nothing is answered: a warm message
is a cache write, not a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from faust.types import EventT
from pydantic import ValidationError

from agents.cache import cacheable, caches
from schemas.messages import Envelope, LLMRequest, LLMResponse, Result, Status
from streams import metrics
from streams.app import Pipeline

STAGE = "warm"


def answered_pairs(
    requests: Iterable[bytes], responses: Iterable[bytes]
) -> Iterator[tuple[bytes, LLMResponse]]:
    """Each request (raw, as published) with the model answer it got; the answers served
    from the cache or a merge are copies, and errors are not answers, so both are skipped,
    as is anything that does not parse."""
    answers: dict[str, LLMResponse] = {}
    for raw in responses:
        try:
            response = LLMResponse.model_validate_json(raw)
        except ValidationError:
            continue
        if response.status is Status.OK and response.output:
            answers[response.id] = response
    for raw in requests:
        try:
            request = LLMRequest.model_validate_json(raw)
        except ValidationError:
            continue
        answer = answers.pop(request.id, None)
        if answer is not None:
            yield raw, answer


def warm_envelope(envelope: Envelope, response: LLMResponse) -> Envelope:
    """A preprocessed request carrying the answer it got, as postprocess would store it."""
    envelope.result = Result(
        output=response.output,
        finish_reason=response.finish_reason,
        model=response.model,
        usage=response.usage,
        cost_usd=response.cost_usd,
    )
    envelope.status = Status.OK
    envelope.model = response.model
    return envelope


def attach(pipeline: Pipeline) -> None:
    layers = caches(pipeline)

    async def warm(event: EventT[bytes], envelope: Envelope) -> None:
        if not cacheable(envelope):
            metrics.stage_events.labels(STAGE, "skipped").inc()
            return
        await layers.store(envelope, event.message.partition)
        metrics.stage_events.labels(STAGE, "stored").inc()

    pipeline.stage_agent(STAGE, warm, screen=False)

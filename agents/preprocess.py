"""Preprocess: turn raw bytes from agents into a validated, normalised, fingerprinted envelope.

Anything that cannot become a request is answered (when it names an id) and dead-lettered
with its raw bytes, so bad input never stops the worker and is never lost.

Under more load than the workers keep up with, requests queue in llm.requests; one that
waited there past `limits.shed_queued_ms` is answered `overloaded` at once, before it is
validated, embedded or sent on (CoDel's sojourn time): shedding then costs a read and a
reply, and the requests still admitted stop waiting behind the ones refused. With
`limits.intake_pause_backlog_ms`, preprocess also stops taking requests while the hops
between the worker's stages queue: new requests then wait in llm.requests, where that
shedding answers them, instead of queueing between stages behind the admitted ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Any, cast

from faust import Stream
from faust.types import EventT, StreamT
from pydantic import ValidationError

from inference.encoder import Encoder
from models.embedding import ensure_embedding_model
from schemas.messages import (
    Envelope,
    ErrorCode,
    ErrorInfo,
    LLMRequest,
    LLMResponse,
    Priority,
    Status,
    dump,
    encode_embedding,
)
from streams import metrics
from streams.app import Pipeline, raw_bytes
from streams.drivers.kafka_transport import on_behalf_of
from streams.locality import SemanticBucketer
from topology.settings import Settings

STAGE = "preprocess"
log = logging.getLogger(__name__)
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
WHITESPACE = re.compile(r"\s+")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
ENCODER = "embedding_encoder"
# faust's take waits forever for a full batch when `within` is 0, so never pass 0.
MIN_BATCH_WAIT_S = 0.0005


class InvalidRequest(Exception):
    """Why a message is answered with an error at once (bad input, an internal failure,
    overload), plus what is known about whom to tell."""

    def __init__(
        self,
        reason: str,
        message: str,
        request_id: str | None,
        reply_topic: str | None,
        code: ErrorCode = ErrorCode.INVALID,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.request_id = request_id
        self.reply_topic = reply_topic


def count_tokens(text: str) -> int:
    """Words and punctuation marks: close enough to BPE counts for limits and routing."""
    return len(TOKEN_PATTERN.findall(text))


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()


def fingerprint(request: LLMRequest) -> str:
    """Hash of everything that changes the answer; whitespace runs do not."""
    canonical = {
        "tenant": request.tenant,
        "api_type": request.api_type,
        "model": request.model,
        "messages": [
            [m.role.value, WHITESPACE.sub(" ", m.content), m.name, m.tool_call_id]
            for m in request.messages
        ],
        "params": request.params.model_dump(mode="json"),
    }
    encoded = json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _fields(raw: bytes) -> dict[str, Any]:
    """The top-level fields of a message, as far as they can be read; {} if not at all."""
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _best_effort_identity(raw: bytes) -> tuple[str | None, str | None]:
    """The id and reply topic of a message we reject, if they can be read at all."""
    return _identity(_fields(raw))


def _identity(data: dict[str, Any]) -> tuple[str | None, str | None]:
    request_id = data.get("id")
    reply_topic = data.get("reply_topic")
    valid_id = request_id if isinstance(request_id, str) and 0 < len(request_id) <= 128 else None
    valid_topic = (
        reply_topic if isinstance(reply_topic, str) and TOPIC_NAME.match(reply_topic) else None
    )
    if valid_id is not None and _has_lone_surrogate(valid_id):
        valid_id = None
    return valid_id, valid_topic


def shed(raw: bytes, queued_s: float, shed_after_s: float | None) -> InvalidRequest | None:
    """The `overloaded` answer for a request that queued past `shed_after_s`, if it is to
    be shed: high priority never is, nor a message with no readable id (preprocess
    answers that one `invalid`)."""
    if shed_after_s is None or queued_s <= shed_after_s:
        return None
    data = _fields(raw)
    request_id, reply_topic = _identity(data)
    if request_id is None or data.get("priority") == Priority.HIGH.value:
        return None
    message = f"waited {queued_s:.1f} s for a worker (over {shed_after_s:g} s): over capacity"
    return InvalidRequest("queued_too_long", message, request_id, reply_topic, ErrorCode.OVERLOADED)


def _schema_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class Preprocessor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        responses = settings.topics.responses.name
        self.internal_topics = {t.name for t in settings.all_topics()} - {responses}

    def parse(self, raw: bytes, queued_s: float = 0.0) -> Envelope:
        """Validate and enrich one raw message, or raise InvalidRequest. `queued_s`, how
        long it waited in llm.requests, is charged to preprocess (`Envelope.mark`): with
        fusion that wait is where a worker's queue is, and the adaptive limit watches it."""
        try:
            envelope = self._parse(raw)
        except RecursionError as exc:
            raise self._invalid(raw, "schema", "message is nested too deeply") from exc
        envelope.stage_entered_at -= max(queued_s, 0.0)
        return envelope

    def _parse(self, raw: bytes) -> Envelope:
        limits = self.settings.limits
        if len(raw) > limits.max_message_bytes:
            raise self._invalid(
                raw,
                "oversized",
                f"message is {len(raw)} bytes; the limit is {limits.max_message_bytes}",
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._invalid(raw, "invalid_unicode", f"message is not UTF-8: {exc}") from exc
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise self._invalid(raw, "not_json", f"message is not JSON: {exc}") from exc
        if SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
            raise self._invalid(raw, "invalid_unicode", "message holds a lone UTF-16 surrogate")
        if not isinstance(data, dict):
            raise self._invalid(raw, "schema", "a request must be a JSON object")
        try:
            request = LLMRequest.model_validate(data)
        except ValidationError as exc:
            raise self._invalid(raw, "schema", _schema_message(exc)) from exc
        self._check_model_and_params(raw, request)
        if request.reply_topic in self.internal_topics:
            raise self._invalid(
                raw, "schema", f"reply_topic {request.reply_topic!r} is one of the pipeline's own"
            )
        if request.reply_topic is not None and not TOPIC_NAME.match(request.reply_topic):
            raise self._invalid(
                raw, "schema", f"reply_topic {request.reply_topic!r} is not a valid topic name"
            )
        for message in request.messages:
            message.content = normalise(message.content)
        envelope = Envelope(request=request)
        envelope.prompt_tokens = sum(count_tokens(m.content) for m in request.messages)
        envelope.fingerprint = fingerprint(request)
        return envelope

    def _check_model_and_params(self, raw: bytes, request: LLMRequest) -> None:
        ceiling = self.settings.limits.max_tokens
        if request.model is not None:
            spec = self.settings.model(request.model)
            if spec is None:
                known = ", ".join(m.name for m in self.settings.models)
                raise self._invalid(
                    raw,
                    "unknown_model",
                    f"model {request.model!r} is not in the registry ({known})",
                )
            ceiling = min(ceiling, spec.max_output_tokens)
        max_tokens = request.params.max_tokens
        if not 1 <= max_tokens <= ceiling:
            raise self._invalid(
                raw,
                "bad_max_tokens",
                f"max_tokens must be between 1 and {ceiling}, got {max_tokens}",
            )

    def _invalid(self, raw: bytes, reason: str, message: str) -> InvalidRequest:
        request_id, reply_topic = _best_effort_identity(raw)
        return InvalidRequest(reason, message, request_id, reply_topic)


def open_encoder(settings: Settings) -> Encoder:
    """The embedding model, exported first if this machine lacks it."""
    folder = ensure_embedding_model(Path(settings.embedding.path))
    return Encoder(
        folder,
        settings.engine.device,
        settings.engine.intra_op_threads,
        settings.embedding.max_batch,
    )


def shared_encoder(pipeline: Pipeline) -> Encoder:
    """The worker's one embedding model."""
    return pipeline.shared(ENCODER, lambda: open_encoder(pipeline.settings))


async def embed_last_user_turns(
    encoder: Encoder, bucketer: SemanticBucketer, envelopes: list[Envelope]
) -> None:
    """Set `embedding` and its LSH bucket on each envelope that has a user turn, one model
    run per batch.

    A failure leaves the envelopes without an embedding: later stages then fall back to
    exact matching, which is better than losing or delaying the requests.
    """
    asking = [(e, text) for e in envelopes if (text := e.request.last_user_turn()) is not None]
    if not asking:
        return
    try:
        vectors = await asyncio.to_thread(encoder.embed, [text for _, text in asking])
    except Exception:
        log.exception("embedding failed for a batch of %d requests", len(asking))
        metrics.stage_events.labels(STAGE, "embedding_failed").inc(len(asking))
        return
    buckets = bucketer.buckets(vectors)
    for (envelope, _), vector, bucket in zip(asking, vectors, buckets, strict=True):
        envelope.embedding = encode_embedding(vector)
        envelope.semantic_bucket = int(bucket)


def error_response(error: InvalidRequest) -> LLMResponse:
    assert error.request_id is not None
    return LLMResponse(
        id=error.request_id,
        status=Status.ERROR,
        error=ErrorInfo(code=error.code, reason=error.reason, message=error.message),
    )


def attach(pipeline: Pipeline) -> None:
    preprocessor = Preprocessor(pipeline.settings)
    shed_queued_ms = pipeline.settings.limits.shed_queued_ms
    shed_after_s = None if shed_queued_ms is None else shed_queued_ms / 1000

    async def hold_intake() -> None:
        """Wait while the requests already admitted queue between stages."""
        if pipeline.backlog is not None and await pipeline.backlog.wait_until_below():
            metrics.stage_events.labels(STAGE, "intake_held").inc()

    async def answer(error: InvalidRequest) -> None:
        metrics.stage_events.labels(STAGE, error.reason).inc()
        if error.request_id is not None:
            response = error_response(error)
            metrics.responses.labels(response.status.value, error.code.value).inc()
            await pipeline.reply_topic(error.reply_topic).send(
                key=error.request_id.encode(), value=dump(response)
            )

    async def reject(event: EventT[bytes], error: InvalidRequest) -> None:
        await answer(error)
        await pipeline.dead_letter(event, error.reason, error.message, error.request_id)

    async def reject_crash(event: EventT[bytes], exc: Exception) -> None:
        log.exception("preprocess failed on offset %s", event.message.offset)
        request_id, reply_topic = _best_effort_identity(raw_bytes(event))
        failure = f"preprocess failed on this message: {exc!r}"
        await reject(
            event,
            InvalidRequest("internal_error", failure, request_id, reply_topic, ErrorCode.INTERNAL),
        )

    async def forward(event: EventT[bytes], envelope: Envelope) -> None:
        try:
            pipeline.mark(envelope, STAGE)
            if await pipeline.screen(envelope, STAGE):
                return
            metrics.stage_events.labels(STAGE, "accepted").inc()
            await pipeline.report(envelope, STAGE)
            await pipeline.send("ratelimit", envelope)
        except Exception as exc:
            await reject_crash(event, exc)

    encoder = shared_encoder(pipeline) if pipeline.settings.embedding.enabled else None
    batch_size = pipeline.settings.embedding.max_batch
    batch_wait_s = max(pipeline.settings.embedding.max_wait_ms / 1000, MIN_BATCH_WAIT_S)

    @pipeline.app.agent(pipeline.requests_topic, name=STAGE)
    async def preprocess(stream: StreamT[bytes]) -> None:
        """Parse a batch, embed its valid requests in one model run, then pass each on.
        faust fills the batch from another task, so what is sent for an event is sent on
        behalf of it (exactly-once puts it in that event's transaction)."""
        batches = cast(Stream[bytes], stream).take_events(batch_size, within=batch_wait_s)
        async for events in batches:
            await hold_intake()
            accepted: list[tuple[EventT[bytes], Envelope]] = []
            now = time.time()
            for event in events:
                with on_behalf_of(event):
                    raw = raw_bytes(event)
                    stamp = event.message.timestamp
                    queued_s = now - stamp if stamp else 0.0
                    overloaded = shed(raw, queued_s, shed_after_s)
                    if overloaded is not None:
                        await answer(overloaded)
                        continue
                    try:
                        envelope = preprocessor.parse(raw, queued_s)
                        envelope.origin_partition = event.message.partition
                        envelope.origin_offset = event.message.offset
                        accepted.append((event, envelope))
                    except InvalidRequest as error:
                        await reject(event, error)
                    except Exception as exc:
                        await reject_crash(event, exc)
            if encoder is not None:
                await embed_last_user_turns(
                    encoder, pipeline.bucketer, [envelope for _, envelope in accepted]
                )
            for event, envelope in accepted:
                with on_behalf_of(event), pipeline.handling(STAGE, event):
                    await forward(event, envelope)

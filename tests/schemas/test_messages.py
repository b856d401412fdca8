"""Wire models: refused extras, schema version, Envelope.mark / fail / expired."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.messages import (
    SCHEMA_VERSION,
    DeadLetter,
    Envelope,
    ErrorCode,
    FeedbackEvent,
    LLMRequest,
    LLMResponse,
    Status,
    StreamChunk,
    decode_embedding,
    dump,
    encode_embedding,
    wire_models,
)


def request(**extra: object) -> LLMRequest:
    return LLMRequest.model_validate(
        {"id": "r1", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}], **extra}
    )


@pytest.mark.parametrize(
    "data",
    [
        {"id": "r1", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}], "x": 1},
        {"id": "r1", "tenant": "acme", "messages": [{"role": "user", "content": "hi", "x": 1}]},
        {
            "id": "r1",
            "tenant": "acme",
            "messages": [{"role": "user", "content": "hi"}],
            "params": {"max_token": 5},
        },
    ],
    ids=["top_level", "message", "params"],
)
def test_extra_fields_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as info:
        LLMRequest.model_validate(data)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_response_refuses_extra_fields() -> None:
    with pytest.raises(ValidationError):
        LLMResponse.model_validate({"id": "r", "status": "ok", "cost": 1})


def test_request_defaults() -> None:
    r = request()
    assert r.schema_version == SCHEMA_VERSION == 1
    assert r.user == "anonymous"
    assert r.params.max_tokens == 256
    assert r.cache.read and r.cache.write
    assert r.model is None and r.reply_topic is None


@pytest.mark.parametrize(
    "message",
    [
        LLMResponse(id="r", status=Status.OK),
        StreamChunk(id="r", index=0, delta="a"),
        DeadLetter(raw_b64="", reason="x", message="y", source_topic="t"),
        FeedbackEvent(request_id="r", tenant="t"),
    ],
    ids=["response", "chunk", "dead_letter", "feedback"],
)
def test_schema_version_is_on_the_wire(message: object) -> None:
    wire = json.loads(dump(message))  # type: ignore[arg-type]
    assert wire["schema_version"] == 1


def test_every_wire_model_has_schema_version() -> None:
    for model in wire_models().values():
        assert "schema_version" in model.model_fields


@pytest.mark.parametrize(
    "data",
    [
        {"id": "", "tenant": "a", "messages": [{"role": "user", "content": "x"}]},
        {"id": "r", "tenant": "a", "messages": []},
        {"id": "r", "tenant": "a", "messages": [{"role": "robot", "content": "x"}]},
        {
            "id": "r",
            "tenant": "a",
            "messages": [{"role": "user", "content": "x"}],
            "params": {"temperature": 2.5},
        },
    ],
    ids=["empty_id", "no_messages", "bad_role", "temperature"],
)
def test_bad_requests_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LLMRequest.model_validate(data)


def test_envelope_round_trips_through_json() -> None:
    env = Envelope(request=request(), fingerprint="f" * 64, prompt_tokens=3, model="sim-small")
    env.mark("preprocess", now=env.stage_entered_at + 0.002)
    back = Envelope.model_validate_json(dump(env))
    assert back == env


def test_envelope_mark_accumulates() -> None:
    env = Envelope(request=request(), stage_entered_at=100.0)
    assert env.mark("dedup", now=100.010) == pytest.approx(10.0)
    assert env.mark("cache", now=100.015) == pytest.approx(5.0)
    assert env.mark("dedup", now=100.025) == pytest.approx(10.0)
    assert env.stage_latency_ms["dedup"] == pytest.approx(20.0)
    assert env.stage_latency_ms["cache"] == pytest.approx(5.0)
    assert env.stage_entered_at == 100.025


def test_envelope_fail_sets_an_error() -> None:
    env = Envelope(request=request(), status=Status.OK)
    env.fail(ErrorCode.OVERLOADED, "batch_queue_full", "too many", retry_after_s=1.5)
    assert env.status == Status.ERROR
    assert env.result is not None
    assert env.result.output is None
    assert env.result.error is not None
    assert env.result.error.code == ErrorCode.OVERLOADED
    assert env.result.error.reason == "batch_queue_full"
    assert env.result.error.message == "too many"
    assert env.result.error.retry_after_s == 1.5


def test_envelope_expired() -> None:
    assert not Envelope(request=request()).expired(now=1e12)
    env = Envelope(request=request(deadline=200.0))
    assert not env.expired(now=199.9)
    assert env.expired(now=200.0)


def test_embedding_round_trips_at_half_precision() -> None:
    vector = np.random.default_rng(7).standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    text = encode_embedding(vector)
    # 384 float16 values are 768 bytes: 1024 base64 characters.
    assert len(text) == 1024
    back = decode_embedding(text)
    assert back.dtype == np.float32
    assert np.abs(back - vector).max() < 1e-3
    assert float(back @ vector) > 0.9999


def test_envelope_carries_its_embedding_through_json() -> None:
    vector = np.linspace(-1.0, 1.0, 384, dtype=np.float32)
    env = Envelope(request=request(), embedding=encode_embedding(vector))
    back = Envelope.model_validate_json(dump(env))
    assert back.embedding is not None and env.embedding is not None
    np.testing.assert_array_equal(decode_embedding(back.embedding), decode_embedding(env.embedding))
    assert Envelope(request=request()).embedding is None

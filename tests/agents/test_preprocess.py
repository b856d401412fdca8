"""Preprocessor.parse: validation, normalisation, fingerprinting and each bad-input reason."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.preprocess import (
    STAGE,
    InvalidRequest,
    Preprocessor,
    count_tokens,
    embed_last_user_turns,
    error_response,
    normalise,
    shared_encoder,
    shed,
)
from inference.encoder import Encoder
from schemas.messages import Envelope, ErrorCode, Status, decode_embedding
from streams import metrics
from streams.app import Pipeline
from streams.locality import bucketer_for
from topology.settings import Settings

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def request(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "req-1",
        "tenant": "acme",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is   the capital\tof France?"},
        ],
        "reply_topic": "replies.acme",
    }
    data.update(overrides)
    return data


def raw(data: Any) -> bytes:
    return json.dumps(data).encode()


@pytest.fixture
def pre() -> Preprocessor:
    return Preprocessor(Settings())


def reject(pre: Preprocessor, payload: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        pre.parse(payload)
    return info.value


def test_valid_request_becomes_an_enriched_envelope(pre: Preprocessor) -> None:
    data = request(
        messages=[{"role": "user", "content": "  Cafe\u0301 au lait?\r\nYes.\r\n  "}],
    )
    envelope = pre.parse(raw(data))
    assert envelope.request.id == "req-1"
    assert envelope.request.tenant == "acme"
    assert envelope.request.reply_topic == "replies.acme"
    assert HEX64.match(envelope.fingerprint)
    # NFC composes e + combining acute into one code point; CRLF becomes LF; ends stripped.
    assert envelope.request.messages[0].content == "Caf\u00e9 au lait?\nYes."
    # "Café", "au", "lait", "?", "Yes", "."
    assert envelope.prompt_tokens == 6
    assert envelope.schema_version == 1
    assert envelope.result is None and envelope.status is None


def test_the_wait_in_the_requests_topic_is_charged_to_preprocess(pre: Preprocessor) -> None:
    waited = pre.parse(raw(request()), queued_s=2.0).mark("preprocess")
    assert 2000.0 <= waited < 2500.0
    assert pre.parse(raw(request()), queued_s=-1.0).mark("preprocess") < 500.0  # clock skew


def test_prompt_tokens_sum_over_all_messages(pre: Preprocessor) -> None:
    envelope = pre.parse(raw(request()))
    # "You are terse." -> 4; "What is the capital of France?" -> 7
    assert envelope.prompt_tokens == 11


def test_whitespace_runs_do_not_change_the_fingerprint(pre: Preprocessor) -> None:
    a = pre.parse(raw(request()))
    spaced = request(
        messages=[
            {"role": "system", "content": "  You   are\nterse.  "},
            {"role": "user", "content": "What is the capital of\r\n\r\nFrance?"},
        ]
    )
    b = pre.parse(raw(spaced))
    assert a.fingerprint == b.fingerprint


def test_fingerprint_ignores_id_and_reply_topic(pre: Preprocessor) -> None:
    a = pre.parse(raw(request()))
    b = pre.parse(raw(request(id="other-id", reply_topic="elsewhere")))
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "globex"},
        {"model": "sim-small"},
        {"params": {"temperature": 0.7}},
        {
            "messages": [
                {"role": "system", "content": "You are verbose."},
                {"role": "user", "content": "What is the capital of France?"},
            ]
        },
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    ],
    ids=["tenant", "model", "temperature", "system_prompt", "no_system_prompt"],
)
def test_what_changes_the_answer_changes_the_fingerprint(
    pre: Preprocessor, change: dict[str, Any]
) -> None:
    base = pre.parse(raw(request()))
    other = pre.parse(raw(request(**change)))
    assert HEX64.match(other.fingerprint)
    assert other.fingerprint != base.fingerprint


def test_not_json_has_no_id(pre: Preprocessor) -> None:
    error = reject(pre, b'{"id": "req-1", "tenant": ')
    assert error.reason == "not_json"
    assert error.request_id is None
    assert error.reply_topic is None


def test_invalid_utf8_is_invalid_unicode_and_keeps_the_id(pre: Preprocessor) -> None:
    payload = raw(request(messages=[{"role": "user", "content": "XX"}])).replace(b"XX", b"\xff\xfe")
    error = reject(pre, payload)
    assert error.reason == "invalid_unicode"
    assert error.request_id == "req-1"
    assert error.reply_topic == "replies.acme"


@pytest.mark.parametrize(
    "escape",
    [
        b"\\ud800",
        b"\\uDBFF",
        b"\\ude00\\ud83d",
        b"\\udc00",
        b"\\uDFFF",
    ],
    ids=["high", "high_upper", "reversed_pair", "low", "low_upper"],
)
def test_lone_surrogate_escape_is_invalid_unicode(pre: Preprocessor, escape: bytes) -> None:
    payload = raw(request(messages=[{"role": "user", "content": "XX"}])).replace(
        b"XX", b"a" + escape + b"b"
    )
    error = reject(pre, payload)
    assert error.reason == "invalid_unicode"
    assert error.request_id == "req-1"
    assert error.reply_topic == "replies.acme"


def test_lone_surrogate_in_the_id_drops_the_id(pre: Preprocessor) -> None:
    payload = raw(request(id="XX")).replace(b"XX", b"id\\ud800")
    error = reject(pre, payload)
    assert error.reason == "invalid_unicode"
    assert error.request_id is None
    assert error.reply_topic == "replies.acme"


def test_surrogate_pair_escape_is_accepted(pre: Preprocessor) -> None:
    payload = raw(request(messages=[{"role": "user", "content": "XX"}])).replace(
        b"XX", b"smile \\ud83d\\ude00"
    )
    envelope = pre.parse(payload)
    assert envelope.request.messages[0].content == "smile \U0001f600"


def test_escaped_backslash_before_u_d800_is_plain_text(pre: Preprocessor) -> None:
    envelope = pre.parse(raw(request(messages=[{"role": "user", "content": "\\ud800"}])))
    assert envelope.request.messages[0].content == "\\ud800"


def test_json_array_is_schema(pre: Preprocessor) -> None:
    error = reject(pre, raw([request()]))
    assert error.reason == "schema"
    assert error.request_id is None


@pytest.mark.parametrize("field", ["tenant", "messages"])
def test_missing_field_is_schema_with_id(pre: Preprocessor, field: str) -> None:
    data = request()
    del data[field]
    error = reject(pre, raw(data))
    assert error.reason == "schema"
    assert field in error.message
    assert error.request_id == "req-1"
    assert error.reply_topic == "replies.acme"


def test_unknown_field_is_schema(pre: Preprocessor) -> None:
    error = reject(pre, raw(request(temprature=0.5)))
    assert error.reason == "schema"
    assert error.request_id == "req-1"


def test_oversized_message(pre: Preprocessor) -> None:
    limit = Settings().limits.max_message_bytes
    big = request(messages=[{"role": "user", "content": "x" * limit}])
    payload = raw(big)
    assert len(payload) > limit
    error = reject(pre, payload)
    assert error.reason == "oversized"
    assert error.request_id == "req-1"
    assert error.reply_topic == "replies.acme"


def test_message_at_exactly_the_limit_is_not_oversized(pre: Preprocessor) -> None:
    limit = Settings().limits.max_message_bytes
    payload = raw(request(messages=[{"role": "user", "content": ""}]))
    padding = limit - len(payload)
    payload = raw(request(messages=[{"role": "user", "content": "a" * padding}]))
    assert len(payload) == limit
    envelope = pre.parse(payload)
    assert envelope.prompt_tokens == 1


def test_unknown_model_hint(pre: Preprocessor) -> None:
    error = reject(pre, raw(request(model="gpt-17")))
    assert error.reason == "unknown_model"
    assert "gpt-17" in error.message
    assert error.request_id == "req-1"


@pytest.mark.parametrize("max_tokens", [0, -5, 10**9])
def test_bad_max_tokens(pre: Preprocessor, max_tokens: int) -> None:
    error = reject(pre, raw(request(params={"max_tokens": max_tokens})))
    assert error.reason == "bad_max_tokens"
    assert str(max_tokens) in error.message
    assert error.request_id == "req-1"
    assert error.reply_topic == "replies.acme"


def test_max_tokens_ceiling_is_the_hinted_models_max_output(pre: Preprocessor) -> None:
    small = Settings().model("sim-small")
    assert small is not None
    ok = pre.parse(raw(request(model="sim-small", params={"max_tokens": small.max_output_tokens})))
    assert ok.request.params.max_tokens == small.max_output_tokens
    error = reject(
        pre, raw(request(model="sim-small", params={"max_tokens": small.max_output_tokens + 1}))
    )
    assert error.reason == "bad_max_tokens"


@pytest.mark.parametrize("topic", ["bad topic!", "a/b", "x" * 250])
def test_bad_reply_topic(pre: Preprocessor, topic: str) -> None:
    error = reject(pre, raw(request(reply_topic=topic)))
    assert error.reason == "schema"
    assert error.request_id == "req-1"
    assert error.reply_topic is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("hello", 1),
        ("Hello, world!", 4),
        ("don't stop", 4),
        ("  spaced   out  ", 2),
        ("3.14 + x_1", 5),
        ("日本語 テキスト", 2),
    ],
)
def test_count_tokens(text: str, expected: int) -> None:
    assert count_tokens(text) == expected


def test_normalise() -> None:
    assert normalise("\r\n  e\u0301\r\nx \n") == "\u00e9\nx"


def test_error_response_is_an_invalid_error() -> None:
    error = InvalidRequest("schema", "tenant: Field required", "req-9", "replies.x")
    response = error_response(error)
    assert response.id == "req-9"
    assert response.status == Status.ERROR
    assert response.output is None
    assert response.error is not None
    assert response.error.code == ErrorCode.INVALID
    assert response.error.reason == "schema"
    assert response.error.message == "tenant: Field required"
    assert response.schema_version == 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
VALID_REQUEST = {"id": "r1", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}]}


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=512),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        st.tuples(
            st.sampled_from(
                [
                    "id",
                    "tenant",
                    "messages",
                    "params",
                    "model",
                    "deadline",
                    "cache",
                    "reply_topic",
                    "priority",
                    "metadata",
                    "stream",
                ]
            ),
            JSON_VALUES,
        ).map(lambda change: json.dumps({**VALID_REQUEST, change[0]: change[1]}).encode()),
    )
)
def test_any_bytes_become_an_envelope_or_an_invalid_request(raw_bytes: bytes) -> None:
    """Whatever arrives, preprocess answers with a request or a reason, never a crash."""
    try:
        envelope = Preprocessor(Settings()).parse(raw_bytes)
    except InvalidRequest as error:
        assert error.reason in {
            "oversized",
            "invalid_unicode",
            "not_json",
            "schema",
            "unknown_model",
            "bad_max_tokens",
        }
        assert error.message
    else:
        assert len(envelope.fingerprint) == 64


def test_deep_nesting_is_a_schema_error_not_a_crash(pre: Preprocessor) -> None:
    deep = "[" * 400 + '"\\ud800"' + "]" * 400
    payload = raw(request()).replace(b'"tenant"', b'"metadata": ' + deep.encode() + b', "tenant"')
    error = reject(pre, payload)
    assert error.reason == "schema" and "nested too deeply" in error.message
    assert error.request_id == "req-1"


def test_reply_topic_may_not_be_one_of_the_pipelines_own(pre: Preprocessor) -> None:
    for topic in ("llm.stage.dedup", "llmflow-cache-exact-changelog", "llm.requests"):
        error = reject(pre, raw(request(reply_topic=topic)))
        assert error.reason == "schema" and "pipeline's own" in error.message
    assert pre.parse(raw(request(reply_topic="llm.responses"))).request.reply_topic


def test_the_last_user_turn_is_what_gets_embedded(pre: Preprocessor) -> None:
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is Kafka?"},
        {"role": "assistant", "content": "A log."},
        {"role": "user", "content": "And Flink?"},
        {"role": "assistant", "content": "A stream processor."},
    ]
    assert pre.parse(raw(request(messages=turns))).request.last_user_turn() == "And Flink?"
    system_only = request(messages=[{"role": "system", "content": "You are terse."}])
    assert pre.parse(raw(system_only)).request.last_user_turn() is None


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """Loaded the way a worker loads it: exported on first use, one per pipeline."""
    pipeline = Pipeline(Settings())
    loaded = shared_encoder(pipeline)
    assert shared_encoder(pipeline) is loaded
    return loaded


def envelopes(pre: Preprocessor) -> list[Envelope]:
    return [
        pre.parse(raw(request(id="a", messages=[{"role": "user", "content": "What is Kafka?"}]))),
        pre.parse(raw(request(id="b", messages=[{"role": "system", "content": "Be terse."}]))),
        pre.parse(raw(request(id="c"))),
    ]


async def test_a_batch_gets_the_embeddings_of_its_last_user_turns(
    pre: Preprocessor, encoder: Encoder
) -> None:
    batch = envelopes(pre)
    bucketer = bucketer_for(Settings())
    await embed_last_user_turns(encoder, bucketer, batch)
    asking, system_only, french = batch
    assert system_only.embedding is None and system_only.semantic_bucket is None
    for envelope in (asking, french):
        assert envelope.embedding is not None
        text = envelope.request.last_user_turn()
        assert text is not None
        expected = encoder.embed([text])[0]
        assert np.abs(decode_embedding(envelope.embedding) - expected).max() < 1e-3
        assert envelope.semantic_bucket == bucketer.bucket(expected)


class BrokenEncoder:
    def embed(self, texts: list[str]) -> np.ndarray:
        raise RuntimeError("the ONNX session failed")


async def test_an_embedding_failure_lets_the_requests_go_on_without_one(
    pre: Preprocessor,
) -> None:
    failures = metrics.stage_events.labels(STAGE, "embedding_failed")
    before = failures._value.get()
    batch = envelopes(pre)
    await embed_last_user_turns(
        BrokenEncoder(),  # type: ignore[arg-type]
        bucketer_for(Settings()),
        batch,
    )
    assert [e.request.id for e in batch] == ["a", "b", "c"]
    assert all(e.embedding is None and e.semantic_bucket is None for e in batch)
    assert failures._value.get() == before + 2


# --- shedding what queued too long ----------------------------------------------------------


def test_a_request_that_queued_past_the_limit_is_answered_overloaded() -> None:
    answer = shed(raw(request()), queued_s=3.0, shed_after_s=2.0)
    assert answer is not None
    assert (answer.code, answer.reason) == (ErrorCode.OVERLOADED, "queued_too_long")
    assert (answer.request_id, answer.reply_topic) == ("req-1", "replies.acme")
    assert error_response(answer).error is not None


def test_a_request_within_the_limit_or_with_shedding_off_goes_on() -> None:
    assert shed(raw(request()), queued_s=1.9, shed_after_s=2.0) is None
    assert shed(raw(request()), queued_s=600.0, shed_after_s=None) is None


def test_high_priority_and_unreadable_messages_are_never_shed() -> None:
    assert shed(raw(request(priority="high")), queued_s=9.0, shed_after_s=2.0) is None
    assert shed(raw(request(priority="low")), queued_s=9.0, shed_after_s=2.0) is not None
    assert shed(b"{not json", queued_s=9.0, shed_after_s=2.0) is None
    assert shed(raw(request(id=7)), queued_s=9.0, shed_after_s=2.0) is None

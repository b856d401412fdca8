"""OpenAI-compatible backend: body mapping, and streaming against the simulated provider."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agents.infer import UpstreamError
from provider.simulated import SimulatedProviderConfig, start_server
from schemas.messages import ChatMessage, Envelope, GenerationParams, LLMRequest, Role
from streams.drivers.openai_http import (
    OpenAIHTTPBackend,
    StreamedCompletion,
    parse_completion,
    request_body,
)
from topology.settings import ModelSpec

SPEC = ModelSpec(name="sim-small", input_per_1k=0.5, output_per_1k=1.5)


def envelope(stop: list[str] | None = None, seed: int | None = None) -> Envelope:
    request = LLMRequest(
        id="r1",
        tenant="acme",
        messages=[
            ChatMessage(role=Role.SYSTEM, content="Be brief."),
            ChatMessage(role=Role.USER, content="Hi", name="bob"),
            ChatMessage(role=Role.TOOL, content="42", tool_call_id="call-1"),
        ],
        params=GenerationParams(
            max_tokens=64, temperature=0.3, top_p=0.9, stop=stop or [], seed=seed
        ),
    )
    return Envelope(request=request, model="sim-small")


def completion(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 2000, "total_tokens": 3000},
    }
    body.update(extra)
    return body


def test_request_body_maps_fields() -> None:
    body = request_body(SPEC, envelope())
    assert body == {
        "model": "sim-small",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "bob"},
            {"role": "tool", "content": "42", "tool_call_id": "call-1"},
        ],
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.9,
    }


def test_request_body_optional_fields_and_upstream_name() -> None:
    spec = ModelSpec(name="small", upstream_model="gpt-4o-mini")
    body = request_body(spec, envelope(stop=["\n\n", "END"], seed=7))
    assert body["model"] == "gpt-4o-mini"
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 7


def test_parse_completion_maps_fields_and_prices_from_the_registry() -> None:
    result = parse_completion(SPEC, completion())
    assert result.output == "Hello!"
    assert result.finish_reason == "stop"
    assert result.model == "sim-small"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (1000, 2000)
    assert result.usage.total_tokens == 3000
    # 1000 * 0.5 / 1000 + 2000 * 1.5 / 1000
    assert result.cost_usd == pytest.approx(3.5)
    assert result.error is None


@pytest.mark.parametrize(("given", "expected"), [(0.25, 0.25), (0, 0.0), (3, 3.0)])
def test_parse_completion_prefers_x_cost_usd(given: float, expected: float) -> None:
    assert parse_completion(SPEC, completion(x_cost_usd=given)).cost_usd == expected


def test_parse_completion_ignores_a_non_numeric_cost() -> None:
    assert parse_completion(SPEC, completion(x_cost_usd="cheap")).cost_usd == pytest.approx(3.5)


def test_parse_completion_without_usage_costs_nothing() -> None:
    body = completion()
    del body["usage"]
    result = parse_completion(SPEC, body)
    assert result.usage.total_tokens == 0
    assert result.cost_usd == 0.0


def test_parse_completion_null_content_is_empty() -> None:
    body = completion()
    body["choices"][0]["message"]["content"] = None
    body["choices"][0]["finish_reason"] = "length"
    result = parse_completion(SPEC, body)
    assert result.output == ""
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"choices": []},
        {"choices": [{}]},
        {"choices": [{"message": None}]},
        {"choices": "nope"},
        {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "many"}},
        {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": None}},
        [],
        "not a body",
    ],
    ids=[
        "empty",
        "no_choices",
        "no_message",
        "null_message",
        "choices_str",
        "usage_str",
        "usage_null",
        "list",
        "str",
    ],
)
def test_unreadable_body_is_a_non_retryable_upstream_error(body: Any) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_completion(SPEC, body)
    assert info.value.retryable is False
    assert info.value.reason == "bad_upstream_body"


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"message": {"content": 5}}]},
        {"choices": [{"message": {"content": "x"}, "finish_reason": 3}]},
        {"choices": [{"message": {"content": "x"}}], "usage": [1, 2]},
    ],
    ids=["int_content", "int_finish_reason", "list_usage"],
)
def test_wrongly_typed_body_is_an_upstream_error(body: Any) -> None:
    with pytest.raises(UpstreamError):
        parse_completion(SPEC, body)


async def test_streamed_completion_passes_deltas_on_and_equals_the_unstreamed_one() -> None:
    config = SimulatedProviderConfig.model_validate({"latency_ms": 0.0, "latency_jitter_ms": 0.0})
    runner, port = await start_server(config)
    backend = OpenAIHTTPBackend(f"http://127.0.0.1:{port}/v1", "sim", 4)
    deltas: list[str] = []

    async def collect(delta: str) -> None:
        deltas.append(delta)

    try:
        plain = await backend.complete(SPEC, envelope())
        streamed = await backend.complete(SPEC, envelope(), collect)
    finally:
        await backend.close()
        await runner.cleanup()
    assert len(deltas) > 1
    assert "".join(deltas) == streamed.output == plain.output
    assert streamed.usage == plain.usage and streamed.usage.completion_tokens > 0
    assert streamed.finish_reason == plain.finish_reason
    assert streamed.cost_usd == pytest.approx(plain.cost_usd)


async def test_a_stream_cut_before_done_is_an_upstream_error() -> None:
    deltas: list[str] = []

    async def collect(delta: str) -> None:
        deltas.append(delta)

    stream = StreamedCompletion(collect)
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
    await stream.feed(f"data: {json.dumps(chunk)}\n")
    assert deltas == ["Hel"]
    with pytest.raises(UpstreamError, match="before \\[DONE\\]"):
        stream.body()

"""The OpenAI mapping of the HTTP ingress, and the server's answers that need no broker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmflow.ingress import ApiError, Call, IngressServer, OpenAIMapping
from schemas.messages import (
    ErrorCode,
    ErrorInfo,
    LLMResponse,
    Priority,
    RequestClass,
    Role,
    Status,
    Usage,
)
from topology.settings import ApiKey, IngressSettings, Settings, load_settings

NOW = 1_700_000_000.0
KEY = ApiKey(tenant="acme")


def settings() -> Settings:
    ingress = IngressSettings.model_validate(
        {"api_keys": {"sk-acme": "acme", "sk-bob": {"tenant": "globex", "user": "bob"}}}
    )
    return Settings().model_copy(update={"ingress": ingress})


MAPPING = OpenAIMapping(settings())


def call_of(body: dict[str, Any], headers: dict[str, str] | None = None) -> Call:
    return MAPPING.call_of(body, KEY, headers or {}, NOW)


def refused(body: object, headers: dict[str, str] | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        MAPPING.call_of(body, KEY, headers or {}, NOW)
    return caught.value


def hello(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello"}], **fields}


def test_keys_name_tenants_and_users_and_unknown_keys_are_refused() -> None:
    assert MAPPING.key_of("Bearer sk-acme") == ApiKey(tenant="acme")
    assert MAPPING.key_of("bearer sk-bob") == ApiKey(tenant="globex", user="bob")
    for header in (None, "", "Bearer sk-nope", "Basic sk-acme", "sk-acme"):
        with pytest.raises(ApiError) as caught:
            MAPPING.key_of(header)
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"


def test_keys_come_from_the_environment_as_json() -> None:
    env = {"LLMFLOW_INGRESS__API_KEYS": '{"k1": "t1", "k2": {"tenant": "t2", "user": "u2"}}'}
    keys = load_settings(environ=env).ingress.api_keys
    assert keys == {"k1": ApiKey(tenant="t1"), "k2": ApiKey(tenant="t2", user="u2")}


def test_a_plain_call_becomes_a_request_of_the_keys_tenant() -> None:
    call = call_of(hello())
    request = call.request
    assert request.tenant == "acme" and request.user == "anonymous"
    assert request.model is None and not request.stream
    assert [(m.role, m.content) for m in request.messages] == [(Role.USER, "hello")]
    assert request.deadline is None and call.wait_s == 120.0
    assert request.cache.read and request.cache.write
    assert request.priority is Priority.NORMAL and request.request_class is None


def test_openai_fields_map_onto_the_request() -> None:
    body = {
        "model": "sim-large",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
            {"role": "tool", "content": "42", "tool_call_id": "t1"},
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 10,
        "max_completion_tokens": 20,
        "stop": "END",
        "seed": 7,
        "n": 1,
        "user": "carol",
        "metadata": {"run": "r1"},
        "stream": True,
        "stream_options": {"include_usage": True},
        "frequency_penalty": 0.0,
    }
    call = call_of(body)
    request = call.request
    assert request.model == "sim-large" and request.stream and call.include_usage
    assert [m.role for m in request.messages] == [Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TOOL]
    assert request.messages[1].content == "a b" and request.messages[2].content == ""
    assert request.messages[3].tool_call_id == "t1"
    params = request.params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.5, 0.9, 20)
    assert params.stop == ["END"] and params.seed == 7
    assert request.user == "carol" and request.metadata == {"run": "r1"}
    assert call_of(hello(model="auto")).request.model is None


def test_a_keys_own_user_wins_over_the_body() -> None:
    bob = MAPPING.key_of("Bearer sk-bob")
    request = MAPPING.call_of(hello(user="mallory"), bob, {}, NOW).request
    assert (request.tenant, request.user) == ("globex", "bob")


def test_llmflow_headers_set_priority_class_deadline_and_cache() -> None:
    headers = {
        "x-llmflow-priority": "HIGH",
        "x-llmflow-request-class": "complex",
        "x-llmflow-deadline-ms": "2500",
        "x-llmflow-cache": "no-cache, no-store",
    }
    call = call_of(hello(), headers)
    request = call.request
    assert request.priority is Priority.HIGH and request.request_class is RequestClass.COMPLEX
    assert request.deadline == NOW + 2.5 and call.wait_s == 2.5 + 5.0
    assert not request.cache.read and not request.cache.write
    assert call_of(hello(), {"x-llmflow-deadline-ms": "900000"}).wait_s == 120.0


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        ([1], {}, 400, None),
        ({"messages": []}, {}, 400, "messages"),
        (hello(n=2), {}, 400, "n"),
        (hello(tools=[{"type": "function"}]), {}, 400, "tools"),
        (hello(logprobs=True), {}, 400, "logprobs"),
        (hello(response_format={"type": "json_object"}), {}, 400, "response_format"),
        (hello(model="gpt-4o"), {}, 404, None),
        (hello(temperature="hot"), {}, 400, "temperature"),
        (hello(temperature=3.0), {}, 400, "params.temperature"),
        (hello(stop=[1]), {}, 400, "stop"),
        ({"messages": [{"role": "function", "content": "x"}]}, {}, 400, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 400, None),
        (hello(), {"x-llmflow-priority": "urgent"}, 400, "x-llmflow-priority"),
        (hello(), {"x-llmflow-deadline-ms": "-1"}, 400, "x-llmflow-deadline-ms"),
        (hello(), {"x-llmflow-deadline-ms": "soon"}, 400, "x-llmflow-deadline-ms"),
        (hello(), {"x-llmflow-cache": "maybe"}, 400, "x-llmflow-cache"),
    ],
)
def test_calls_the_pipeline_cannot_honour_are_refused(
    body: object, headers: dict[str, str], status: int, param: str | None
) -> None:
    error = refused(body, headers)
    assert error.status == status
    if param is not None:
        assert error.param == param
    assert error.body()["error"]["message"]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.INVALID, 400),
        (ErrorCode.RATE_LIMITED, 429),
        (ErrorCode.OVERLOADED, 503),
        (ErrorCode.TIMEOUT, 504),
        (ErrorCode.UPSTREAM_ERROR, 502),
        (ErrorCode.INTERNAL, 500),
        (ErrorCode.CANCELLED, 499),
    ],
)
def test_pipeline_errors_become_http_errors(code: ErrorCode, status: int) -> None:
    error = MAPPING.error_of(ErrorInfo(code=code, reason="why", message="what"))
    assert error.status == status and error.code == "why"
    assert error.body()["error"]["message"] == "what" and error.headers() == {}


def test_rate_limited_says_when_to_retry() -> None:
    info = ErrorInfo(
        code=ErrorCode.RATE_LIMITED, reason="tenant", message="slow", retry_after_s=1.2
    )
    assert MAPPING.error_of(info).headers() == {"Retry-After": "2", "retry-after-ms": "1200"}


def answer(**fields: Any) -> LLMResponse:
    values: dict[str, Any] = {
        "id": "r1",
        "status": Status.CACHED,
        "output": "four",
        "finish_reason": "length",
        "model": "sim-small",
        "cache_kind": "exact",
        "usage": Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    }
    return LLMResponse.model_validate({**values, **fields})


def test_a_response_becomes_a_chat_completion_with_llmflows_extension() -> None:
    call = call_of(hello())
    body = MAPPING.completion(call, answer())
    assert body["id"] == "r1" and body["object"] == "chat.completion"
    assert body["model"] == "sim-small" and body["created"] == int(NOW)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "four"},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert body["llmflow"]["status"] == "cached" and body["llmflow"]["cache_kind"] == "exact"
    assert MAPPING.headers_of(answer()) == {
        "x-request-id": "r1",
        "x-llmflow-status": "cached",
        "x-llmflow-cache-kind": "exact",
    }
    assert MAPPING.finish_reason(answer(finish_reason=None)) == "stop"
    assert MAPPING.finish_reason(None) == "stop"


def sse_payload(event: bytes) -> Any:
    text = event.decode()
    assert text.startswith("data: ") and text.endswith("\n\n")
    return json.loads(text[len("data: ") : -2])


def test_chunks_are_sse_events_of_chat_completion_chunks() -> None:
    call = call_of(hello(stream=True))
    delta = sse_payload(MAPPING.chunk(call, {"content": " word"}))
    assert delta["object"] == "chat.completion.chunk" and delta["id"] == call.request.id
    assert delta["model"] == "auto" and "llmflow" not in delta
    assert delta["choices"] == [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]
    last = sse_payload(MAPPING.chunk(call, {}, "stop", answer()))
    assert last["model"] == "sim-small" and last["choices"][0]["finish_reason"] == "stop"
    assert last["llmflow"]["status"] == "cached"
    usage = sse_payload(MAPPING.usage_chunk(call, answer()))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 4
    error = sse_payload(ApiError(504, "late", "timeout_error").sse())
    assert error["error"]["type"] == "timeout_error"


@pytest.fixture
async def http() -> AsyncIterator[TestClient[Any, Any]]:
    """The server's routes without its client started: only answers made before a
    request reaches the pipeline."""
    server = IngressServer(settings())
    async with TestClient(TestServer(server.app)) as running:
        yield running


async def test_models_lists_the_registry_to_a_known_key(http: TestClient[Any, Any]) -> None:
    reply = await http.get("/v1/models", headers={"Authorization": "Bearer sk-acme"})
    assert reply.status == 200
    listed = [m["id"] for m in (await reply.json())["data"]]
    assert listed == [m.name for m in Settings().models]
    refused_reply = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert refused_reply.status == 401
    assert (await refused_reply.json())["error"]["code"] == "invalid_api_key"


async def test_chat_refuses_bad_keys_and_bodies_before_the_pipeline(
    http: TestClient[Any, Any],
) -> None:
    unknown = await http.post("/v1/chat/completions", json=hello())
    assert unknown.status == 401
    key = {"Authorization": "Bearer sk-acme"}
    not_json = await http.post("/v1/chat/completions", data=b"{", headers=key)
    assert not_json.status == 400
    too_many = await http.post("/v1/chat/completions", json=hello(n=3), headers=key)
    assert too_many.status == 400 and (await too_many.json())["error"]["param"] == "n"

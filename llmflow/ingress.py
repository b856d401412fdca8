"""OpenAI-compatible HTTP ingress: `POST /v1/chat/completions` (with `stream` as SSE) and
`GET /v1/models`, so an agent written against the OpenAI SDK calls the pipeline unchanged
but for its base URL and key.

Each call becomes one request on the request topic and waits for its response through one
`LLMFlowClient` per server; an API key names the tenant (and maybe the user) the call is
made for, so a key can never read another tenant's cache. `OpenAIMapping` holds the pure
translation both ways; `IngressServer` is the thin aiohttp part.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from llmflow.client import LLMFlowClient, Streamed
from schemas.messages import (
    CachePolicy,
    ErrorCode,
    ErrorInfo,
    LLMRequest,
    LLMResponse,
    Priority,
    RequestClass,
    Role,
    StreamChunk,
)
from topology.settings import ApiKey, Settings

AUTO_MODEL = "auto"
ROLES = {
    "system": Role.SYSTEM,
    "developer": Role.SYSTEM,
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "tool": Role.TOOL,
}
# Fields whose meaning the pipeline cannot honour: refusing them beats a silently wrong answer.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "audio")
FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls"}
# HTTP status, OpenAI error type, for each way the pipeline answers with an error.
ERROR_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID: (400, "invalid_request_error"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorCode.OVERLOADED: (503, "overloaded_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.UPSTREAM_ERROR: (502, "upstream_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
    # nginx's "client closed request": the request was cancelled on purpose.
    ErrorCode.CANCELLED: (499, "cancelled"),
}
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answer in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds, as HTTP has it; the SDK also reads the milliseconds."""
        if self.retry_after_s is None:
            return {}
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after_s * 1000))),
        }

    def sse(self) -> bytes:
        """The error as an SSE event, for a stream that already sent its headers."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


@dataclass
class Call:
    """One HTTP call mapped onto the pipeline: its request and how the answer is wanted."""

    request: LLMRequest
    wait_s: float
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{name} must be a number", param=name)
    return float(value)


def _text_of(content: object, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined by spaces)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"{where}: only text content parts are supported", param=where)
            texts.append(str(part.get("text", "")))
        return " ".join(texts)
    raise ApiError(400, f"{where}: content must be a string or a list of parts", param=where)


def _messages(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role = ROLES.get(str(message.get("role")))
        if role is None:
            raise ApiError(400, f"{where}: unknown role {message.get('role')!r}", param=where)
        mapped: dict[str, Any] = {"role": role, "content": _text_of(message.get("content"), where)}
        for name in ("name", "tool_call_id"):
            if message.get(name) is not None:
                mapped[name] = message[name]
        messages.append(mapped)
    return messages


def _stop(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return list(raw)
    raise ApiError(400, "stop must be a string or a list of strings", param="stop")


def _enum_header(headers: Mapping[str, str], name: str, kind: type[Priority | RequestClass]) -> Any:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return kind(value.strip().lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ApiError(400, f"{name} must be one of {allowed}", param=name) from None


def _positive_header(headers: Mapping[str, str], name: str) -> float:
    try:
        value = float(headers[name])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ApiError(400, f"{name} must be a positive number", param=name)
    return value


def _cache_policy(headers: Mapping[str, str]) -> CachePolicy:
    """`x-llmflow-cache: no-cache` skips reading the cache and merging, `no-store` writing."""
    words = {w.strip().lower() for w in headers.get("x-llmflow-cache", "").split(",") if w.strip()}
    unknown = words - {"no-cache", "no-store"}
    if unknown:
        raise ApiError(400, f"x-llmflow-cache: unknown {sorted(unknown)}", param="x-llmflow-cache")
    return CachePolicy(read="no-cache" not in words, write="no-store" not in words)


class OpenAIMapping:
    """OpenAI's chat completion JSON to llmflow's request and back; no I/O."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = [m.name for m in settings.models]

    def key_of(self, authorization: str | None) -> ApiKey:
        scheme, _, token = (authorization or "").partition(" ")
        key = (
            self.settings.ingress.api_keys.get(token.strip())
            if scheme.lower() == "bearer"
            else None
        )
        if key is None:
            raise ApiError(401, "unknown API key", "invalid_request_error", "invalid_api_key")
        return key

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "llmflow"}
                for name in self.models
            ],
        }

    def call_of(self, body: object, key: ApiKey, headers: Mapping[str, str], now: float) -> Call:
        """The request an HTTP call asks for, or an ApiError saying what is wrong with it."""
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        for name in UNSUPPORTED_FIELDS:
            if body.get(name) is not None:
                raise ApiError(400, f"{name} is not supported", param=name)
        if body.get("n") not in (None, 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.get("logprobs"):
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise ApiError(
                400, "only the text response format is supported", param="response_format"
            )
        model = body.get("model")
        if model in (None, AUTO_MODEL):
            model = None
        elif model not in self.models:
            raise ApiError(
                404, f"model {model!r} does not exist", "invalid_request_error", "model_not_found"
            )
        params: dict[str, Any] = {"stop": _stop(body.get("stop"))}
        for name in ("temperature", "top_p"):
            value = _number(body, name)
            if value is not None:
                params[name] = value
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if body.get("seed") is not None:
            params["seed"] = body["seed"]
        wait_s = self.settings.ingress.max_wait_s
        deadline = None
        if headers.get("x-llmflow-deadline-ms") is not None:
            deadline_ms = _positive_header(headers, "x-llmflow-deadline-ms")
            deadline = now + deadline_ms / 1000.0
            wait_s = min(wait_s, deadline_ms / 1000.0 + self.settings.ingress.deadline_grace_s)
        fields: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "tenant": key.tenant,
            "user": key.user or body.get("user") or "anonymous",
            "messages": _messages(body.get("messages")),
            "model": model,
            "params": params,
            "deadline": deadline,
            "cache": _cache_policy(headers),
            "stream": bool(body.get("stream")),
            "metadata": body.get("metadata") or {},
            "created_at": now,
        }
        priority = _enum_header(headers, "x-llmflow-priority", Priority)
        if priority is not None:
            fields["priority"] = priority
        fields["request_class"] = _enum_header(headers, "x-llmflow-request-class", RequestClass)
        try:
            request = LLMRequest.model_validate(fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ApiError(400, f"{where}: {error['msg']}", param=where) from None
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return Call(request, wait_s, include_usage, int(now))

    @staticmethod
    def error_of(error: ErrorInfo) -> ApiError:
        status, kind = ERROR_STATUS[error.code]
        return ApiError(
            status, error.message, kind, error.reason, retry_after_s=error.retry_after_s
        )

    @staticmethod
    def timed_out(wait_s: float) -> ApiError:
        return ApiError(504, f"no answer within {wait_s:g} s", "timeout_error", "ingress_wait")

    @staticmethod
    def extension(response: LLMResponse) -> dict[str, Any]:
        """What llmflow adds to OpenAI's answer: how the request was served."""
        return {
            "status": response.status.value,
            "cache_kind": response.cache_kind,
            "cache_tier": response.cache_tier,
            "merged_with": response.merged_with,
            "degraded": response.degraded,
            "cost_usd": response.cost_usd,
            "latency_ms": response.latency_ms,
        }

    @staticmethod
    def headers_of(response: LLMResponse) -> dict[str, str]:
        headers = {"x-request-id": response.id, "x-llmflow-status": response.status.value}
        if response.cache_kind is not None:
            headers["x-llmflow-cache-kind"] = response.cache_kind
        return headers

    @staticmethod
    def finish_reason(response: LLMResponse | None) -> str:
        reason = response.finish_reason if response is not None else None
        return reason if reason in FINISH_REASONS else "stop"

    def completion(self, call: Call, response: LLMResponse) -> dict[str, Any]:
        return {
            "id": response.id,
            "object": "chat.completion",
            "created": call.created,
            "model": response.model or call.request.model or AUTO_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": response.output or ""},
                    "finish_reason": self.finish_reason(response),
                    "logprobs": None,
                }
            ],
            "usage": response.usage.model_dump(),
            "llmflow": self.extension(response),
        }

    @staticmethod
    def chunk(
        call: Call,
        delta: dict[str, str],
        finish_reason: str | None = None,
        response: LLMResponse | None = None,
    ) -> bytes:
        """One `chat.completion.chunk` SSE event; the last one says how the request went."""
        payload: dict[str, Any] = {
            "id": call.request.id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": (response.model if response else None) or call.request.model or AUTO_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if response is not None:
            payload["llmflow"] = OpenAIMapping.extension(response)
        return f"data: {json.dumps(payload)}\n\n".encode()

    @staticmethod
    def usage_chunk(call: Call, response: LLMResponse) -> bytes:
        """The last event when `stream_options.include_usage` asked for it, as OpenAI sends."""
        payload = {
            "id": call.request.id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": response.model or call.request.model or AUTO_MODEL,
            "choices": [],
            "usage": response.usage.model_dump(),
        }
        return f"data: {json.dumps(payload)}\n\n".encode()


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(
        error.body(), status=error.status, headers={**error.headers(), **(headers or {})}
    )


class IngressServer:
    """The aiohttp server: one client (one reply topic) shared by every call in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mapping = OpenAIMapping(settings)
        self.client = LLMFlowClient(settings)
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self._runner: web.AppRunner | None = None
        self.port = settings.ingress.port

    async def start(self) -> None:
        await self.client.start()
        try:
            await self.client.start_streams()
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.ingress.host, self.settings.ingress.port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop taking calls, let those in flight end, then close the client."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.client.stop()

    async def __aenter__(self) -> IngressServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.ingress.host}:{self.port}/v1"

    async def _models(self, http: web.Request) -> web.Response:
        try:
            self.mapping.key_of(http.headers.get("Authorization"))
        except ApiError as exc:
            return error_response(exc)
        return web.json_response(self.mapping.model_list())

    async def _chat(self, http: web.Request) -> web.StreamResponse:
        try:
            key = self.mapping.key_of(http.headers.get("Authorization"))
            try:
                body = await http.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "the body is not JSON") from None
            call = self.mapping.call_of(body, key, http.headers, time.time())
        except ApiError as exc:
            return error_response(exc)
        if call.request.stream:
            return await self._stream(http, call)
        return await self._complete(call)

    async def _give_up(self, call: Call) -> ApiError:
        """The caller stops waiting, so the pipeline stops working on it too."""
        await self.client.cancel(call.request.id, "the HTTP call stopped waiting")
        return self.mapping.timed_out(call.wait_s)

    async def _complete(self, call: Call) -> web.Response:
        try:
            response = await self.client.call(call.request, timeout=call.wait_s)
        except TimeoutError:
            return error_response(await self._give_up(call))
        if response.error is not None:
            return error_response(
                self.mapping.error_of(response.error), self.mapping.headers_of(response)
            )
        return web.json_response(
            self.mapping.completion(call, response), headers=self.mapping.headers_of(response)
        )

    async def _stream(self, http: web.Request, call: Call) -> web.StreamResponse:
        """Headers wait for the first chunk, so a request refused before any text (rate
        limited, invalid, overloaded) gets its HTTP error status as a plain call would."""
        async with self.client.stream(call.request, call.wait_s) as streamed:
            chunks = streamed.chunks()
            async with contextlib.aclosing(chunks):
                try:
                    first = await anext(chunks)
                except TimeoutError:
                    return error_response(await self._give_up(call))
                if first.done and first.error is not None:
                    return error_response(self.mapping.error_of(first.error))
                reply = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "x-request-id": call.request.id,
                    }
                )
                await reply.prepare(http)
                try:
                    await reply.write(
                        self.mapping.chunk(call, {"role": "assistant", "content": ""})
                    )
                    await self._write_stream(reply, call, streamed, first, chunks)
                except ConnectionError:
                    await self.client.cancel(call.request.id, "the HTTP caller went away")
                    return reply
        await reply.write(SSE_DONE)
        await reply.write_eof()
        return reply

    async def _write_stream(
        self,
        reply: web.StreamResponse,
        call: Call,
        streamed: Streamed,
        chunk: StreamChunk,
        chunks: AsyncGenerator[StreamChunk, None],
    ) -> None:
        try:
            while True:
                if chunk.delta:
                    await reply.write(self.mapping.chunk(call, {"content": chunk.delta}))
                if chunk.done:
                    break
                chunk = await anext(chunks)
        except TimeoutError:
            await reply.write((await self._give_up(call)).sse())
            return
        if chunk.error is not None:
            await reply.write(self.mapping.error_of(chunk.error).sse())
            return
        response = await streamed.final()
        finish = self.mapping.finish_reason(response)
        await reply.write(self.mapping.chunk(call, {}, finish, response))
        if call.include_usage and response is not None:
            await reply.write(self.mapping.usage_chunk(call, response))

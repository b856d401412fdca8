"""OpenAI-compatible chat-completions backend over HTTP, with a pooled connection per host."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from agents.infer import Delta, UpstreamError
from schemas.messages import Envelope, Result, Usage
from topology.settings import ModelSpec

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def request_body(spec: ModelSpec, envelope: Envelope) -> dict[str, Any]:
    request = envelope.request
    body: dict[str, Any] = {
        "model": spec.upstream_model or spec.name,
        "messages": [
            {k: v for k, v in m.model_dump(mode="json").items() if v is not None}
            for m in request.messages
        ],
        "max_tokens": request.params.max_tokens,
        "temperature": request.params.temperature,
        "top_p": request.params.top_p,
    }
    if request.params.stop:
        body["stop"] = request.params.stop
    if request.params.seed is not None:
        body["seed"] = request.params.seed
    return body


class StreamedCompletion:
    """Folds the SSE chunks of a streamed chat completion into the body of an unstreamed one,
    passing each content delta on as it comes."""

    def __init__(self, on_delta: Delta) -> None:
        self.on_delta = on_delta
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.tail: dict[str, Any] = {}
        self.done = False

    async def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.parts.append(content)
                await self.on_delta(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        for key in ("usage", "x_cost_usd"):
            if key in chunk:
                self.tail[key] = chunk[key]

    def body(self) -> dict[str, Any]:
        if not self.done:
            raise UpstreamError("stream_broken", "the stream ended before [DONE]", True)
        message = {"content": "".join(self.parts)}
        return {"choices": [{"message": message, "finish_reason": self.finish_reason}], **self.tail}


def parse_completion(spec: ModelSpec, body: dict[str, Any]) -> Result:
    """A chat.completion body to a Result; cost from the registry's prices when not given."""
    try:
        choice = body["choices"][0]
        output = choice["message"]["content"] or ""
        raw_usage = body.get("usage") or {}
        usage = Usage(
            prompt_tokens=int(raw_usage.get("prompt_tokens", 0)),
            completion_tokens=int(raw_usage.get("completion_tokens", 0)),
            total_tokens=int(raw_usage.get("total_tokens", 0)),
        )
        priced = spec.price(usage.prompt_tokens, usage.completion_tokens)
        cost = body.get("x_cost_usd")
        return Result(
            output=output,
            finish_reason=choice.get("finish_reason"),
            model=spec.name,
            usage=usage,
            cost_usd=float(cost) if isinstance(cost, int | float) else priced,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError("bad_upstream_body", f"unreadable completion: {exc!r}", False) from exc


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


class OpenAIHTTPBackend:
    def __init__(self, default_base_url: str, api_key: str, max_connections: int) -> None:
        self.default_base_url = default_base_url.rstrip("/")
        self.api_key = api_key
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"Authorization": f"Bearer {self.api_key}"}
            )
        return self._session

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        url = f"{(spec.base_url or self.default_base_url).rstrip('/')}/chat/completions"
        body = request_body(spec, envelope)
        if on_delta is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        try:
            async with self._client().post(url, json=body) as reply:
                if reply.status != 200:
                    text = (await reply.text())[:500]
                    raise UpstreamError(
                        f"http_{reply.status}",
                        f"{spec.name} answered {reply.status}: {text}",
                        retryable=reply.status in RETRYABLE_STATUS,
                        retry_after_s=_retry_after(reply.headers),
                    )
                if on_delta is None:
                    answer = await reply.json(content_type=None)
                else:
                    stream = StreamedCompletion(on_delta)
                    async for line in reply.content:
                        await stream.feed(line.decode())
                    answer = stream.body()
        except ValueError as exc:
            raise UpstreamError("bad_upstream_body", f"{spec.name}: {exc!r}", False) from exc
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError("connection", f"{spec.name}: {exc!r}", retryable=True) from exc
        return parse_completion(spec, answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

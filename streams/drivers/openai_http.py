"""OpenAI-compatible chat-completions backend over HTTP, with a pooled connection per host."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from agents.infer import UpstreamError
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
        priced = (
            usage.prompt_tokens * spec.input_per_1k + usage.completion_tokens * spec.output_per_1k
        ) / 1000.0
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

    async def complete(self, spec: ModelSpec, envelope: Envelope) -> Result:
        url = f"{(spec.base_url or self.default_base_url).rstrip('/')}/chat/completions"
        try:
            async with self._client().post(url, json=request_body(spec, envelope)) as reply:
                if reply.status != 200:
                    text = (await reply.text())[:500]
                    raise UpstreamError(
                        f"http_{reply.status}",
                        f"{spec.name} answered {reply.status}: {text}",
                        retryable=reply.status in RETRYABLE_STATUS,
                        retry_after_s=_retry_after(reply.headers),
                    )
                body = await reply.json(content_type=None)
        except ValueError as exc:
            raise UpstreamError("bad_upstream_body", f"{spec.name}: {exc!r}", False) from exc
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError("connection", f"{spec.name}: {exc!r}", retryable=True) from exc
        return parse_completion(spec, body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

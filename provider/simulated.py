"""Simulated LLM provider speaking the OpenAI-compatible chat-completions HTTP API.

Tests, the demo and the benchmarks talk to this server instead of a real vendor so that
answers are free, deterministic and reproducible, while latency, errors, rate limits and
hangs can be injected (and switched at runtime via ``POST /admin/config``) to exercise the
pipeline's retry, cache and merge logic. ``GET /stats`` exposes how many upstream calls
were really made, which is what cache/merge tests assert on.

Answer rule (pure, see :func:`full_answer_words`): the answer is
``[<model>] answer <sha256(model, messages)[:8]>: <first 8 words of the last user message>``
followed by filler words picked from the digest, ``completion_tokens`` whitespace tokens
long, then cut to ``max_tokens`` tokens (``finish_reason == "length"`` when cut).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "LLMFLOW_SIM_"
ECHO_WORDS = 8
FILLER_WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "stream", "token", "agent", "model", "cache", "merge",
)  # fmt: skip
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class ModelPrice(BaseModel):
    """USD price per 1000 tokens, so usage can be turned into a cost the pipeline can check."""

    input_per_1k: float = Field(ge=0.0)
    output_per_1k: float = Field(ge=0.0)


def _default_models() -> dict[str, ModelPrice]:
    return {
        "sim-small": ModelPrice(input_per_1k=0.0001, output_per_1k=0.0002),
        "sim-large": ModelPrice(input_per_1k=0.001, output_per_1k=0.002),
    }


class SimulatedProviderConfig(BaseModel):
    """Knobs for latency and fault injection; rates are fractions of calls in [0, 1]."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    latency_ms: float = Field(default=50.0, ge=0.0)
    latency_jitter_ms: float = Field(default=10.0, ge=0.0)
    per_token_ms: float = Field(default=0.0, ge=0.0)
    completion_tokens: int = Field(default=32, ge=1)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    rate_limit_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    hang_s: float = Field(default=30.0, ge=0.0)
    stream_break_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="streams that stop halfway, without [DONE]"
    )
    seed: int = 0
    models: dict[str, ModelPrice] = Field(default_factory=_default_models)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX
    ) -> SimulatedProviderConfig:
        """Build from ``LLMFLOW_SIM_<FIELD>`` vars (``MODELS`` is JSON) so k8s can configure it."""
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for name in cls.model_fields:
            value = env.get(prefix + name.upper())
            if value is None or value == "":
                continue
            raw[name] = json.loads(value) if name == "models" else value
        return cls.model_validate(raw)

    def updated(self, patch: Mapping[str, Any]) -> SimulatedProviderConfig:
        """Return a validated copy with top-level fields replaced (``models`` is replaced whole)."""
        merged = self.model_dump()
        merged.update(patch)
        return type(self).model_validate(merged)


# --------------------------------------------------------------------------- request schema


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One OpenAI chat message; content may be text, content parts, or null (tool calls)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[_ContentPart] | None = None

    def text(self) -> str:
        """Plain text of the message, joining text parts so hashing/counting is stable."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return " ".join(p.text for p in self.content if p.text is not None)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of the OpenAI body we honour; unknown fields (temperature, n...) are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None

    def effective_max_tokens(self) -> int | None:
        """``max_tokens`` wins; newer clients send ``max_completion_tokens`` instead."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


# --------------------------------------------------------------------------- pure answer logic


def answer_digest(model: str, messages: Sequence[ChatMessage]) -> str:
    """sha256 over model + (role, text) pairs: the identity of a prompt for the answer."""
    canon = json.dumps(
        {"model": model, "messages": [[m.role, m.text()] for m in messages]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def full_answer_words(model: str, messages: Sequence[ChatMessage], length: int) -> list[str]:
    """The untruncated answer as whitespace tokens, exactly ``length`` long (may cut the head)."""
    digest = answer_digest(model, messages)
    last_user = next((m.text() for m in reversed(messages) if m.role == "user"), "")
    words = [f"[{model}]", "answer", f"{digest[:8]}:", *last_user.split()[:ECHO_WORDS]]
    seed = bytes.fromhex(digest)
    i = 0
    while len(words) < length:
        if i >= len(seed):
            seed = hashlib.sha256(seed).digest()
            i = 0
        words.append(FILLER_WORDS[seed[i] % len(FILLER_WORDS)])
        i += 1
    return words[:length]


def make_answer(
    model: str, messages: Sequence[ChatMessage], max_tokens: int | None, completion_tokens: int
) -> tuple[list[str], Literal["stop", "length"]]:
    """Answer words and finish reason: cut to ``max_tokens`` → "length", else "stop"."""
    words = full_answer_words(model, messages, completion_tokens)
    if max_tokens is not None and max_tokens < len(words):
        return words[:max_tokens], "length"
    return words, "stop"


def count_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Word runs plus single punctuation marks over all message texts (roles not counted)."""
    return sum(len(_TOKEN_RE.findall(m.text())) for m in messages)


def cost_usd(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> float:
    """Vendor-style cost: tokens / 1000 * per-1k price, input and output priced separately."""
    return (
        prompt_tokens / 1000.0 * price.input_per_1k
        + completion_tokens / 1000.0 * price.output_per_1k
    )


# --------------------------------------------------------------------------- server


FaultKind = Literal["server_error", "rate_limited", "timeout"]


@dataclass
class ProviderStats:
    """Counters a test reads through ``GET /stats`` to see how many upstream calls happened."""

    calls: int = 0
    completed: int = 0
    streamed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls_by_model: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    ERROR_KINDS: ClassVar[tuple[str, ...]] = (
        "bad_request",
        "not_found",
        "server_error",
        "rate_limited",
        "timeout",
        "stream_broken",
        "client_disconnected",
    )

    def __post_init__(self) -> None:
        for kind in self.ERROR_KINDS:
            self.errors.setdefault(kind, 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "completed": self.completed,
            "streamed": self.streamed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
            "calls_by_model": dict(self.calls_by_model),
            "errors": dict(self.errors),
            "errors_total": sum(self.errors.values()),
        }


def _error(status: int, message: str, type_: str, code: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "code": code}}, status=status
    )


class SimulatedProvider:
    """Per-app state (config, seeded RNG, stats) and the HTTP handlers using it."""

    def __init__(self, config: SimulatedProviderConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = ProviderStats()
        self._closing = asyncio.Event()

    # ----------------------------------------------------------------- helpers

    def _draw_fault(self) -> FaultKind | None:
        """One uniform draw partitioned by the rates, so ``rate=1.0`` means every call."""
        cfg = self.config
        u = self.rng.random()
        if u < cfg.error_rate:
            return "server_error"
        if u < cfg.error_rate + cfg.rate_limit_rate:
            return "rate_limited"
        if u < cfg.error_rate + cfg.rate_limit_rate + cfg.timeout_rate:
            return "timeout"
        return None

    def _base_latency_s(self) -> float:
        cfg = self.config
        jitter = self.rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms)
        return max(0.0, cfg.latency_ms + jitter) / 1000.0

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early on shutdown, so hung calls never block server cleanup."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    async def on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()

    # ----------------------------------------------------------------- handlers

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats.calls += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._chat_completions(request)
        finally:
            self.stats.in_flight -= 1

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            req = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            self.stats.errors["bad_request"] += 1
            first = exc.errors()[0] if exc.errors() else {"msg": str(exc), "loc": ()}
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            return _error(
                400,
                f"invalid request: {where}: {first['msg']}",
                "invalid_request_error",
                "invalid_request",
            )
        price = self.config.models.get(req.model)
        if price is None:
            self.stats.errors["not_found"] += 1
            return _error(
                404,
                f"The model `{req.model}` does not exist",
                "invalid_request_error",
                "model_not_found",
            )
        by_model = self.stats.calls_by_model
        by_model[req.model] = by_model.get(req.model, 0) + 1

        fault = self._draw_fault()
        if fault == "rate_limited":
            self.stats.errors["rate_limited"] += 1
            resp = _error(429, "Rate limit reached (simulated)", "rate_limit_error", "rate_limited")
            resp.headers["Retry-After"] = "1"
            return resp
        latency = self._base_latency_s()
        if fault == "timeout":
            self.stats.errors["timeout"] += 1
            await self._sleep(self.config.hang_s)
            return _error(504, "Upstream timed out (simulated)", "timeout_error", "timeout")
        if fault == "server_error":
            await self._sleep(latency)
            self.stats.errors["server_error"] += 1
            return _error(500, "Internal server error (simulated)", "server_error", "server_error")

        words, finish = make_answer(
            req.model, req.messages, req.effective_max_tokens(), self.config.completion_tokens
        )
        prompt_tokens = count_prompt_tokens(req.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        cost = cost_usd(price, prompt_tokens, len(words))
        completion_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return await self._stream(
                request,
                model=req.model,
                completion_id=completion_id,
                created=created,
                words=words,
                finish=finish,
                usage=usage,
                include_usage=include_usage,
                cost=cost,
                latency_s=latency,
            )

        await self._sleep(latency + self.config.per_token_ms * len(words) / 1000.0)
        self._record_success(usage, cost)
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
                "x_cost_usd": cost,
            }
        )

    def _record_success(self, usage: Mapping[str, int], cost: float) -> None:
        self.stats.completed += 1
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        self.stats.cost_usd += cost

    async def _stream(
        self,
        request: web.Request,
        *,
        model: str,
        completion_id: str,
        created: int,
        words: list[str],
        finish: str,
        usage: dict[str, int],
        include_usage: bool,
        cost: float,
        latency_s: float,
    ) -> web.StreamResponse:
        """SSE: role chunk, one chunk per word (space-prefixed after the first), finish, [DONE]."""

        def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await self._sleep(latency_s)
        try:
            await resp.prepare(request)
            await resp.write(chunk({"role": "assistant", "content": ""}, None))
            per_token_s = self.config.per_token_ms / 1000.0
            breaks_at = (
                len(words) // 2 if self.rng.random() < self.config.stream_break_rate else None
            )
            for i, word in enumerate(words):
                if i == breaks_at:
                    self.stats.errors["stream_broken"] += 1
                    await resp.write_eof()
                    return resp
                await self._sleep(per_token_s)
                await resp.write(chunk({"content": word if i == 0 else " " + word}, None))
            await resp.write(chunk({}, finish))
            if include_usage:
                tail = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                    "x_cost_usd": cost,
                }
                await resp.write(f"data: {json.dumps(tail)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.stats.errors["client_disconnected"] += 1
            return resp
        self.stats.streamed += 1
        self._record_success(usage, cost)
        return resp

    async def models(self, _request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "owned_by": "llmflow-sim"}
            for name in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    async def reset_stats(self, _request: web.Request) -> web.Response:
        """Zero the counters between test phases (in-flight is kept: those calls still run)."""
        in_flight = self.stats.in_flight
        self.stats = ProviderStats(in_flight=in_flight, max_in_flight=in_flight)
        return web.json_response(self.stats.as_json())

    async def get_config(self, _request: web.Request) -> web.Response:
        return web.json_response(self.config.model_dump())

    async def post_config(self, request: web.Request) -> web.Response:
        """Apply a partial config; a new ``seed`` re-seeds the RNG for reproducible phases."""
        try:
            patch = json.loads(await request.read())
            if not isinstance(patch, dict):
                raise ValueError("config patch must be a JSON object")
            new = self.config.updated(patch)
        except (ValueError, ValidationError) as exc:
            return _error(400, f"invalid config: {exc}", "invalid_request_error", "invalid_config")
        if "seed" in patch:
            self.rng.seed(new.seed)
        self.config = new
        return web.json_response(new.model_dump())


PROVIDER_KEY = web.AppKey("simulated_provider", SimulatedProvider)


def create_app(config: SimulatedProviderConfig) -> web.Application:
    """Build the aiohttp app; its :class:`SimulatedProvider` is at ``app[PROVIDER_KEY]``."""
    provider = SimulatedProvider(config)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[PROVIDER_KEY] = provider
    app.on_shutdown.append(provider.on_shutdown)
    app.router.add_post("/v1/chat/completions", provider.chat_completions)
    app.router.add_get("/v1/models", provider.models)
    app.router.add_get("/health", provider.health)
    app.router.add_get("/stats", provider.get_stats)
    app.router.add_post("/stats/reset", provider.reset_stats)
    app.router.add_get("/admin/config", provider.get_config)
    app.router.add_post("/admin/config", provider.post_config)
    return app


async def start_server(
    config: SimulatedProviderConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start listening (``port=0`` picks a free port); returns the runner and the bound port."""
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    if not addresses:
        await runner.cleanup()
        raise RuntimeError("simulated provider did not bind a socket")
    return runner, int(addresses[0][1])


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m provider.simulated",
        description="Simulated OpenAI-compatible LLM provider (defaults from LLMFLOW_SIM_* env).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float)
    p.add_argument("--latency-jitter-ms", type=float)
    p.add_argument("--per-token-ms", type=float)
    p.add_argument("--completion-tokens", type=int)
    p.add_argument("--error-rate", type=float)
    p.add_argument("--rate-limit-rate", type=float)
    p.add_argument("--timeout-rate", type=float)
    p.add_argument("--hang-s", type=float)
    p.add_argument("--stream-break-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--models", help='JSON, e.g. {"m": {"input_per_1k": 0.1, "output_per_1k": 0.2}}')
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimulatedProviderConfig:
    """Env vars give the base config; explicitly passed CLI flags override them."""
    patch: dict[str, Any] = {}
    for name in SimulatedProviderConfig.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            patch[name] = json.loads(value) if name == "models" else value
    return SimulatedProviderConfig.from_env().updated(patch)


async def _serve(config: SimulatedProviderConfig, host: str, port: int) -> None:
    runner, bound = await start_server(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"simulated provider listening on http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    args = _parse_args(argv)
    asyncio.run(_serve(config_from_args(args), args.host, args.port))


if __name__ == "__main__":
    main()

"""InferenceRunner over HTTP against the simulated provider's faults: retries, breaker
states, fallbacks, degraded answers, hung calls and streams that break halfway.

Each model has its own provider server, so one can fail while the other answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from agents.breaker import BreakerState
from agents.infer import InferenceRunner
from agents.respond import build_response, chunks_sent_by_infer, stream_chunks
from provider.simulated import PROVIDER_KEY, SimulatedProviderConfig, start_server
from schemas.messages import (
    ChatMessage,
    Envelope,
    ErrorCode,
    LLMRequest,
    Role,
    Status,
    StreamChunk,
)
from streams.drivers.openai_http import OpenAIHTTPBackend
from topology.settings import BreakerSettings, InferSettings, ModelSpec, Settings

MODELS = ("sim-small", "sim-large")


@dataclass
class Providers:
    runners: dict[str, web.AppRunner]
    urls: dict[str, str]

    def set(self, model: str, **knobs: Any) -> None:
        """Change a model's provider at runtime, as POST /admin/config does."""
        provider = self.runners[model].app[PROVIDER_KEY]
        provider.config = provider.config.updated(knobs)

    def calls(self, model: str) -> int:
        return self.runners[model].app[PROVIDER_KEY].stats.calls


@pytest.fixture
async def providers() -> AsyncIterator[Providers]:
    runners, urls = {}, {}
    for model in MODELS:
        config = SimulatedProviderConfig(latency_ms=5.0, latency_jitter_ms=0.0, hang_s=30.0)
        runners[model], port = await start_server(config)
        urls[model] = f"http://127.0.0.1:{port}/v1"
    yield Providers(runners, urls)
    for runner in runners.values():
        await runner.cleanup()


@pytest.fixture
async def backend() -> AsyncIterator[OpenAIHTTPBackend]:
    http = OpenAIHTTPBackend("http://unused.invalid/v1", "sim", max_connections=64)
    yield http
    await http.close()


def settings(providers: Providers, **infer: Any) -> Settings:
    models = [
        ModelSpec(name=name, base_url=providers.urls[name], input_per_1k=price, output_per_1k=price)
        for name, price in zip(MODELS, (0.1, 1.0), strict=True)
    ]
    values: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_max_s": 0.01, **infer}
    return Settings(models=models, infer=InferSettings(**values))


def envelope(request_id: str, model: str, **extra: Any) -> Envelope:
    request = LLMRequest(
        id=request_id,
        tenant="acme",
        messages=[ChatMessage(role=Role.USER, content=request_id)],
        **extra,
    )
    return Envelope(request=request, model=model, prompt_tokens=2)


async def test_retries_ride_out_a_provider_failing_half_its_calls(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-large", error_rate=0.5, seed=3)
    runner = InferenceRunner(settings(providers, retries=6, degrade=False), backend, seed=1)
    out = await runner.run([envelope(f"r{i}", "sim-large") for i in range(20)])
    assert all(e.status is Status.OK for e in out)
    assert all(e.result is not None and e.result.model == "sim-large" for e in out)
    assert providers.calls("sim-large") > 20  # some needed a retry


async def test_a_dead_model_opens_its_breaker_and_its_chain_answers_then_it_recovers(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-small", error_rate=1.0)
    breaker = BreakerSettings(min_calls=4, failure_rate=0.5, cooldown_s=0.3)
    runner = InferenceRunner(settings(providers, retries=1, breaker=breaker), backend)
    first = await runner.run([envelope(f"a{i}", "sim-small") for i in range(2)])
    assert all(e.result is not None and e.result.model == "sim-large" for e in first)
    assert runner.breakers.of("sim-small").state is BreakerState.OPEN
    before = providers.calls("sim-small")

    (skipped,) = await runner.run([envelope("b", "sim-small")])
    assert skipped.status is Status.OK and skipped.result is not None
    assert skipped.result.model == "sim-large" and skipped.result.degraded is None
    assert providers.calls("sim-small") == before  # not called while open

    providers.set("sim-small", error_rate=0.0)
    await asyncio.sleep(0.3)
    assert runner.breakers.of("sim-small").state is BreakerState.HALF_OPEN
    (probe,) = await runner.run([envelope("c", "sim-small")])
    assert probe.result is not None and probe.result.model == "sim-small"
    assert runner.breakers.of("sim-small").state is BreakerState.CLOSED


async def test_a_failed_probe_opens_the_breaker_again(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-small", error_rate=1.0)
    breaker = BreakerSettings(min_calls=2, failure_rate=0.5, cooldown_s=0.2)
    runner = InferenceRunner(settings(providers, retries=1, breaker=breaker), backend)
    await runner.run([envelope("a", "sim-small")])
    await asyncio.sleep(0.2)
    (env,) = await runner.run([envelope("b", "sim-small")])
    assert env.result is not None and env.result.model == "sim-large"
    assert runner.breakers.of("sim-small").state is BreakerState.OPEN


async def test_hung_calls_are_cut_and_a_cheaper_model_answers_degraded(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-large", timeout_rate=1.0)
    runner = InferenceRunner(settings(providers, retries=1), backend)
    (env,) = await runner.run([envelope("r", "sim-large", deadline=time.time() + 1.5)])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-small" and env.result.degraded == "cheaper_model"
    assert providers.calls("sim-large") == 2
    response = build_response(env, time.time())
    assert response.degraded == "cheaper_model"


async def test_when_every_call_hangs_the_request_times_out_by_its_deadline(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    for model in MODELS:
        providers.set(model, timeout_rate=1.0)
    runner = InferenceRunner(settings(providers), backend)
    started = time.monotonic()
    (env,) = await runner.run([envelope("r", "sim-small", deadline=time.time() + 0.6)])
    assert time.monotonic() - started < 5.0  # not the provider's 30 s hang
    assert env.status is Status.ERROR and env.result is not None and env.result.error
    assert env.result.error.code is ErrorCode.TIMEOUT


async def test_a_retry_after_beyond_the_deadline_goes_to_the_next_model_at_once(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-small", rate_limit_rate=1.0)  # answers 429 with Retry-After: 1
    runner = InferenceRunner(settings(providers), backend)
    (env,) = await runner.run([envelope("r", "sim-small", deadline=time.time() + 0.5)])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-large"
    assert providers.calls("sim-small") == 1


async def test_a_stream_that_breaks_halfway_ends_with_an_error_chunk(
    providers: Providers, backend: OpenAIHTTPBackend
) -> None:
    providers.set("sim-small", stream_break_rate=1.0, completion_tokens=8)
    sent: list[StreamChunk] = []

    async def sink(chunk: StreamChunk) -> None:
        sent.append(chunk)

    runner = InferenceRunner(settings(providers), backend, sink)
    (env,) = await runner.run([envelope("r", "sim-small", stream=True)])
    assert env.status is Status.ERROR and env.result is not None and env.result.error
    assert env.result.error.reason == "stream_broken"
    assert providers.calls("sim-small") == 1 and providers.calls("sim-large") == 0
    response = build_response(env, time.time())
    chunks = sent + stream_chunks(response, chunks_sent_by_infer(env))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert len(sent) == 4
    assert chunks[-1].done and chunks[-1].error is not None
    assert chunks[-1].error.reason == "stream_broken"

"""Real-HTTP tests for the simulated OpenAI-compatible provider (server bound on port 0)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from provider.simulated import (
    ChatMessage,
    SimulatedProviderConfig,
    count_prompt_tokens,
    make_answer,
    start_server,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = {"latency_ms": 0.0, "latency_jitter_ms": 0.0}


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """Start a provider with fast defaults plus overrides; yield a session and its base URL."""
    config = SimulatedProviderConfig.model_validate({**FAST, **overrides})
    runner, port = await start_server(config)
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def body(text: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-small",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


async def chat(
    session: aiohttp.ClientSession, base: str, payload: Any
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{base}/v1/chat/completions", json=payload) as resp:
        return resp.status, await resp.json()


def content(data: dict[str, Any]) -> str:
    text = data["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/stats") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def test_answer_is_deterministic_and_input_dependent() -> None:
    async with running() as (session, base):
        s1, a = await chat(session, base, body())
        s2, b = await chat(session, base, body())
        s3, c = await chat(session, base, body("Tell me about Rome"))
        s4, d = await chat(session, base, {**body(), "model": "sim-large"})
    assert (s1, s2, s3, s4) == (200, 200, 200, 200)
    assert content(a) == content(b)
    assert content(a) != content(c)
    assert content(a) != content(d)
    assert content(a).startswith("[sim-small] answer ")
    assert "What is the capital of France?" in content(a)
    assert content(d).startswith("[sim-large] answer ")
    assert a["id"] != b["id"]
    assert a["object"] == "chat.completion"
    assert a["model"] == "sim-small"
    assert isinstance(a["created"], int)
    assert a["choices"][0]["index"] == 0
    assert a["choices"][0]["message"]["role"] == "assistant"
    # Same across server instances, and equal to the pure helper tests can use offline.
    async with running(seed=123) as (session, base):
        _, again = await chat(session, base, body())
    assert content(again) == content(a)
    msgs = [ChatMessage.model_validate(m) for m in body()["messages"]]
    words, finish = make_answer("sim-small", msgs, None, 32)
    assert content(a) == " ".join(words)
    assert finish == "stop"


async def test_max_tokens_truncates_with_finish_reason_length() -> None:
    async with running() as (session, base):
        _, full = await chat(session, base, body())
        _, cut = await chat(session, base, body(max_tokens=5))
        _, roomy = await chat(session, base, body(max_tokens=1000))
        _, newer = await chat(session, base, body(max_completion_tokens=7))
    assert len(content(full).split()) == 32
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] == 32
    assert len(content(cut).split()) == 5
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5
    assert content(full).startswith(content(cut))
    assert content(roomy) == content(full)
    assert roomy["choices"][0]["finish_reason"] == "stop"
    assert len(content(newer).split()) == 7
    assert newer["choices"][0]["finish_reason"] == "length"


async def test_usage_and_cost_match_prices() -> None:
    payload: dict[str, Any] = {
        "model": "sim-large",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello, world!"},
        ],
        "max_tokens": 10,
        "temperature": 0.7,
        "n": 3,
    }
    async with running() as (session, base):
        status, data = await chat(session, base, payload)
    assert status == 200
    usage = data["usage"]
    # "Be" "brief" "." + "Hello" "," "world" "!" = 7
    assert usage["prompt_tokens"] == 7
    assert usage["completion_tokens"] == 10 == len(content(data).split())
    assert usage["total_tokens"] == 17
    assert data["x_cost_usd"] == pytest.approx(7 / 1000 * 0.001 + 10 / 1000 * 0.002)
    msgs = [ChatMessage.model_validate(m) for m in payload["messages"]]
    assert count_prompt_tokens(msgs) == 7


async def test_unknown_model_is_404_openai_style() -> None:
    async with running() as (session, base):
        status, data = await chat(session, base, {**body(), "model": "gpt-nope"})
        st = await stats(session, base)
    assert status == 404
    assert set(data["error"]) == {"message", "type", "code"}
    assert data["error"]["code"] == "model_not_found"
    assert "gpt-nope" in data["error"]["message"]
    assert st["errors"]["not_found"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        json.dumps({"model": "sim-small"}).encode(),
        json.dumps({"model": "sim-small", "messages": []}).encode(),
        json.dumps({"model": "sim-small", "messages": [{"content": "no role"}]}).encode(),
        json.dumps({**body(), "max_tokens": 0}).encode(),
        json.dumps({**body(), "model": 5}).encode(),
    ],
)
async def test_malformed_body_is_400(raw: bytes) -> None:
    async with running() as (session, base):
        async with session.post(
            f"{base}/v1/chat/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as resp:
            status, data = resp.status, await resp.json()
        st = await stats(session, base)
    assert status == 400
    assert set(data["error"]) == {"message", "type", "code"}
    assert data["error"]["type"] == "invalid_request_error"
    assert st["errors"]["bad_request"] == 1
    assert st["completed"] == 0


async def test_content_parts_and_null_content_are_accepted() -> None:
    payload: dict[str, Any] = {
        "model": "sim-small",
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "user", "content": [{"type": "text", "text": "parts work"}]},
        ],
    }
    async with running() as (session, base):
        status, data = await chat(session, base, payload)
    assert status == 200
    assert "parts work" in content(data)


async def test_error_rate_one_gives_500() -> None:
    async with running(error_rate=1.0) as (session, base):
        results = [await chat(session, base, body()) for _ in range(3)]
        st = await stats(session, base)
    assert [s for s, _ in results] == [500, 500, 500]
    assert results[0][1]["error"]["type"] == "server_error"
    assert st["errors"]["server_error"] == 3
    assert st["calls"] == 3
    assert st["completed"] == 0


async def test_rate_limit_rate_one_gives_429_with_retry_after() -> None:
    async with running(rate_limit_rate=1.0) as (session, base):
        async with session.post(f"{base}/v1/chat/completions", json=body()) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            data = await resp.json()
        st = await stats(session, base)
    assert data["error"]["code"] == "rate_limited"
    assert st["errors"]["rate_limited"] == 1


async def test_timeout_rate_hangs_then_504_and_shutdown_is_not_blocked() -> None:
    async with running(timeout_rate=1.0, hang_s=0.2) as (session, base):
        t0 = time.monotonic()
        status, data = await chat(session, base, body())
        assert time.monotonic() - t0 >= 0.2
    assert status == 504
    assert data["error"]["code"] == "timeout"

    # A long hang: the client gives up; server cleanup must not wait for hang_s.
    t0 = time.monotonic()
    async with running(timeout_rate=1.0, hang_s=30.0) as (session, base):
        with pytest.raises(asyncio.TimeoutError):
            await chat_with_timeout(session, base, 0.3)
        st = await stats(session, base)
        assert st["in_flight"] == 1
        assert st["errors"]["timeout"] == 1
    assert time.monotonic() - t0 < 10.0


async def chat_with_timeout(session: aiohttp.ClientSession, base: str, seconds: float) -> None:
    timeout = aiohttp.ClientTimeout(total=seconds)
    async with session.post(f"{base}/v1/chat/completions", json=body(), timeout=timeout) as r:
        await r.read()


async def test_fault_pattern_is_reproducible_for_a_seed() -> None:
    async def pattern(seed: int) -> list[int]:
        async with running(error_rate=0.3, rate_limit_rate=0.3, seed=seed) as (session, base):
            return [(await chat(session, base, body()))[0] for _ in range(20)]

    a, b, c = await pattern(7), await pattern(7), await pattern(8)
    assert a == b
    assert a != c
    assert {200, 429, 500} <= set(a) | set(c)


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """Return the data payloads of an SSE body, in order."""
    raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


async def test_streaming_chunks_concatenate_to_the_plain_answer() -> None:
    async with running(per_token_ms=1.0) as (session, base):
        _, plain = await chat(session, base, body(max_tokens=12))
        async with session.post(
            f"{base}/v1/chat/completions", json=body(max_tokens=12, stream=True)
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            payloads = await read_sse(resp)
        st = await stats(session, base)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    word_chunks = chunks[1:-1]
    assert len(word_chunks) == 12
    assert all(c["choices"][0]["finish_reason"] is None for c in word_chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == content(plain)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert st["streamed"] == 1
    assert st["completed"] == 2
    assert st["completion_tokens"] == 24


async def test_streaming_include_usage_adds_usage_chunk() -> None:
    payload = body(stream=True, stream_options={"include_usage": True})
    async with running() as (session, base):
        _, plain = await chat(session, base, body())
        async with session.post(f"{base}/v1/chat/completions", json=payload) as resp:
            payloads = await read_sse(resp)
    assert payloads[-1] == "[DONE]"
    usage_chunk = json.loads(payloads[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]
    assert usage_chunk["x_cost_usd"] == pytest.approx(plain["x_cost_usd"])
    assert json.loads(payloads[-3])["choices"][0]["finish_reason"] == "stop"


async def test_stats_count_calls_and_in_flight() -> None:
    async with running(latency_ms=300.0) as (session, base):
        slow = asyncio.create_task(chat(session, base, body()))
        await asyncio.sleep(0.1)
        during = await stats(session, base)
        await slow
        await chat(session, base, {**body(), "model": "sim-large"})
        await chat(session, base, {**body(), "model": "missing"})
        after = await stats(session, base)
        async with session.post(f"{base}/stats/reset") as resp:
            assert resp.status == 200
        reset = await stats(session, base)
    assert during["in_flight"] == 1
    assert during["calls"] == 1
    assert after["calls"] == 3
    assert after["completed"] == 2
    assert after["in_flight"] == 0
    assert after["max_in_flight"] == 1
    assert after["calls_by_model"] == {"sim-small": 1, "sim-large": 1}
    assert after["errors"]["not_found"] == 1
    assert after["errors_total"] == 1
    assert after["completion_tokens"] == 64
    assert after["cost_usd"] > 0
    assert reset["calls"] == 0
    assert reset["errors_total"] == 0


async def test_admin_config_switches_behaviour_at_runtime() -> None:
    async with running() as (session, base):
        assert (await chat(session, base, body()))[0] == 200
        async with session.post(f"{base}/admin/config", json={"error_rate": 1.0}) as resp:
            assert resp.status == 200
            cfg = await resp.json()
        assert cfg["error_rate"] == 1.0
        assert cfg["latency_ms"] == 0.0  # untouched fields keep their values
        assert (await chat(session, base, body()))[0] == 500
        async with session.post(
            f"{base}/admin/config", json={"error_rate": 0.0, "completion_tokens": 6}
        ) as resp:
            assert resp.status == 200
        status, data = await chat(session, base, body())
        assert status == 200
        assert len(content(data).split()) == 6
        async with session.post(f"{base}/admin/config", json={"error_rate": 2.0}) as resp:
            assert resp.status == 400
            assert "error" in await resp.json()
        async with session.post(f"{base}/admin/config", json={"bogus": 1}) as resp:
            assert resp.status == 400
        async with session.get(f"{base}/admin/config") as resp:
            current = await resp.json()
        assert current["error_rate"] == 0.0
        assert current["completion_tokens"] == 6


async def test_models_and_health() -> None:
    async with running() as (session, base):
        async with session.get(f"{base}/v1/models") as resp:
            models = await resp.json()
        async with session.get(f"{base}/health") as resp:
            health = (resp.status, await resp.text())
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"sim-small", "sim-large"}
    assert all(m["object"] == "model" for m in models["data"])
    assert health == (200, "ok")


def test_config_from_env() -> None:
    env = {
        "LLMFLOW_SIM_LATENCY_MS": "5",
        "LLMFLOW_SIM_ERROR_RATE": "0.25",
        "LLMFLOW_SIM_SEED": "9",
        "LLMFLOW_SIM_MODELS": '{"m": {"input_per_1k": 1, "output_per_1k": 2}}',
        "UNRELATED": "x",
    }
    cfg = SimulatedProviderConfig.from_env(env)
    assert cfg.latency_ms == 5.0
    assert cfg.error_rate == 0.25
    assert cfg.seed == 9
    assert list(cfg.models) == ["m"]
    assert cfg.completion_tokens == 32
    assert SimulatedProviderConfig.from_env({}) == SimulatedProviderConfig()


async def test_cli_prints_bound_port_and_stops_on_sigterm() -> None:
    env = {**os.environ, "LLMFLOW_SIM_LATENCY_MS": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider.simulated",
        "--port",
        "0",
        "--completion-tokens",
        "4",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("simulated provider listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession() as session:
            status, data = await chat(session, base, body())
        assert status == 200
        assert len(content(data).split()) == 4
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

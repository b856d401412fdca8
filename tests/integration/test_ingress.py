"""The OpenAI-compatible ingress over the real pipeline (Tansu, Redis, one worker), driven
by the official `openai` SDK with nothing changed but its base URL and key."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from llmflow.ingress import IngressServer
from tests.integration.conftest import FROZEN_TENANT, WORKER_START_S, RunningPipeline
from topology.settings import IngressSettings

pytestmark = pytest.mark.integration

MODEL = "sim-small"
KEYS = {"sk-a": "ingress-a", "sk-b": "ingress-b", "sk-frozen": FROZEN_TENANT}
NO_CACHE = {"x-llmflow-cache": "no-cache"}
CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
async def ingress(tansu_pipeline: RunningPipeline) -> AsyncIterator[IngressServer]:
    ingress = IngressSettings.model_validate({"port": 0, "api_keys": KEYS})
    settings = tansu_pipeline.settings.model_copy(update={"ingress": ingress})
    async with IngressServer(settings) as server:
        warm = sdk(server, "sk-a", timeout=WORKER_START_S)
        await warm.chat.completions.create(model=MODEL, messages=ask(f"warm-up {uuid.uuid4()}"))
        yield server


def sdk(server: IngressServer, key: str, **options: Any) -> openai.AsyncOpenAI:
    options.setdefault("timeout", CALL_TIMEOUT_S)
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, **options)


def ask(prompt: str) -> list[Any]:
    return [{"role": "user", "content": prompt}]


async def streamed_parts(
    client: openai.AsyncOpenAI, prompt: str, **extra: Any
) -> tuple[list[str], Any]:
    """The text pieces of a streamed answer, as they came, and its last chunk."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=ask(prompt), stream=True, **extra
    )
    parts: list[str] = []
    last = None
    async for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return parts, last


async def streamed_text(client: openai.AsyncOpenAI, prompt: str, **extra: Any) -> tuple[str, Any]:
    parts, last = await streamed_parts(client, prompt, **extra)
    return "".join(parts), last


async def test_a_call_returns_the_models_answer_with_llmflows_status(
    ingress: IngressServer,
) -> None:
    client = sdk(ingress, "sk-a")
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask(f"What does a pipeline do? {uuid.uuid4()}"), max_tokens=12
    )
    completion = raw.parse()
    assert raw.headers["x-llmflow-status"] == "ok"
    assert completion.id == raw.headers["x-request-id"]
    assert completion.model == MODEL
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content
    assert message.content.startswith(f"[{MODEL}] answer")
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert (completion.model_extra or {})["llmflow"]["status"] == "ok"


async def test_a_stream_joins_to_the_plain_answer_fresh_and_cached(
    ingress: IngressServer,
) -> None:
    client = sdk(ingress, "sk-a")
    prompt = f"Stream me a story about rivers {uuid.uuid4()}"
    plain = await client.chat.completions.create(
        model=MODEL, messages=ask(prompt), extra_headers=NO_CACHE
    )
    answer = plain.choices[0].message.content
    assert answer
    words = len(answer.split(" "))
    fresh, last = await streamed_parts(
        client, prompt, extra_headers=NO_CACHE, stream_options={"include_usage": True}
    )
    # One piece per word: the model's own tokens came through, not the whole answer at once.
    assert "".join(fresh) == answer and len(fresh) == words
    assert last.usage is not None and last.usage.completion_tokens > 0
    cached, last = await streamed_parts(client, prompt)
    assert "".join(cached) == answer and len(cached) == words
    assert last.choices[0].finish_reason == "stop"
    assert last.model_extra["llmflow"]["status"] == "cached"


async def test_concurrent_streams_of_one_prompt_each_get_the_whole_answer(
    ingress: IngressServer,
) -> None:
    """Copies sent together merge behind one model call (or hit its cached answer): each
    stream still carries the whole text and ends."""
    client = sdk(ingress, "sk-b")
    prompt = f"Tell me everything about lakes {uuid.uuid4()}"
    results = await asyncio.gather(*(streamed_text(client, prompt) for _ in range(3)))
    texts = {text for text, _ in results}
    assert len(texts) == 1 and texts.pop().startswith(f"[{MODEL}] answer")
    statuses = sorted(last.model_extra["llmflow"]["status"] for _, last in results)
    assert statuses.count("ok") == 1, statuses


async def test_many_concurrent_calls_each_get_their_own_answer(ingress: IngressServer) -> None:
    client = sdk(ingress, "sk-a")
    tokens = [uuid.uuid4().hex[:12] for _ in range(12)]
    completions = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=MODEL, messages=ask(f"Echo {token}"), extra_headers=NO_CACHE
            )
            for token in tokens
        )
    )
    for token, completion in zip(tokens, completions, strict=True):
        assert token in (completion.choices[0].message.content or "")
    assert len({c.id for c in completions}) == len(tokens)


async def test_models_lists_the_registry(ingress: IngressServer) -> None:
    listed = [model.id async for model in sdk(ingress, "sk-a").models.list()]
    assert listed == [model.name for model in ingress.settings.models]


async def test_a_bad_key_is_refused(ingress: IngressServer) -> None:
    stranger = sdk(ingress, "sk-nobody")
    with pytest.raises(openai.AuthenticationError):
        await stranger.chat.completions.create(model=MODEL, messages=ask("hello"))
    with pytest.raises(openai.AuthenticationError):
        await stranger.models.list()


async def test_an_unknown_model_is_not_found(ingress: IngressServer) -> None:
    with pytest.raises(openai.NotFoundError):
        await sdk(ingress, "sk-a").chat.completions.create(model="gpt-4o", messages=ask("hi"))


async def test_a_rate_limited_tenant_gets_rate_limit_errors(ingress: IngressServer) -> None:
    """The frozen tenant's bucket holds two requests and never refills in a test run."""
    client = sdk(ingress, "sk-frozen", max_retries=0)
    refused: openai.RateLimitError | None = None
    for i in range(4):
        try:
            await client.chat.completions.create(model=MODEL, messages=ask(f"spend {i}"))
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None, "the frozen tenant was never refused"
    assert int(refused.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        await streamed_text(client, f"stream when refused {uuid.uuid4()}")


async def test_two_tenants_never_get_each_others_cached_answers(ingress: IngressServer) -> None:
    first, second = sdk(ingress, "sk-a"), sdk(ingress, "sk-b")
    prompt = f"Which tenant asked this? {uuid.uuid4()}"

    async def status(client: openai.AsyncOpenAI) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ask(prompt)
        )
        return raw.headers["x-llmflow-status"]

    assert await status(first) == "ok"
    assert await status(first) == "cached"
    assert await status(second) == "ok"
    assert await status(second) == "cached"

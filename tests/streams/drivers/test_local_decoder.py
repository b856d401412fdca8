"""The local ONNX backend: zoo models answer chat requests, priced, and stream as they go."""

from __future__ import annotations

import pytest

from agents.infer import UpstreamError
from models.tasks import check, make_items
from schemas.messages import ChatMessage, Envelope, ErrorCode, GenerationParams, LLMRequest, Role
from streams.drivers.local_decoder import LocalDecoderBackend, prompt_of
from topology.settings import EngineSettings, ModelSpec, Settings

SETTINGS = Settings()
ENGINE = EngineSettings(device="cpu", intra_op_threads=1, max_batch=8)


def envelope(content: str) -> Envelope:
    request = LLMRequest(
        id="r1",
        tenant="acme",
        messages=[
            ChatMessage(role=Role.SYSTEM, content="Answer the task."),
            ChatMessage(role=Role.USER, content="an earlier turn"),
            ChatMessage(role=Role.ASSISTANT, content="ok"),
            ChatMessage(role=Role.USER, content=content),
        ],
        params=GenerationParams(max_tokens=16),
    )
    return Envelope(request=request, model="zoo-small")


def zoo(name: str) -> ModelSpec:
    spec = SETTINGS.model(name)
    assert spec is not None
    return spec


def test_the_prompt_is_the_last_user_turn() -> None:
    assert prompt_of(envelope("reverse abc=")) == "reverse abc="


async def test_a_zoo_model_answers_and_is_priced() -> None:
    backend = LocalDecoderBackend(ENGINE, SETTINGS.models)
    (item,) = make_items("sort", "easy", 1, seed=3, split="heldout")
    spec = zoo("zoo-small")
    result = await backend.complete(spec, envelope(item.prompt))
    assert check(item, result.output or "")
    assert result.model == "zoo-small" and result.finish_reason == "stop"
    assert result.usage.prompt_tokens == len(item.prompt) + 1  # characters and <bos>
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.cost_usd == pytest.approx(
        spec.price(result.usage.prompt_tokens, result.usage.completion_tokens)
    )
    await backend.close()


async def test_deltas_stream_while_the_answer_is_generated() -> None:
    backend = LocalDecoderBackend(ENGINE, SETTINGS.models)
    deltas: list[str] = []

    async def collect(delta: str) -> None:
        deltas.append(delta)

    result = await backend.complete(zoo("zoo-large"), envelope("reverse kafka="), collect)
    await backend.close()
    assert len(deltas) > 1 and "".join(deltas) == result.output


async def test_a_model_that_is_not_loaded_is_a_clear_upstream_error() -> None:
    backend = LocalDecoderBackend(ENGINE, [])
    with pytest.raises(UpstreamError, match="zoo-small is not loaded"):
        await backend.complete(zoo("zoo-small"), envelope("sort cba="))


async def test_a_prompt_longer_than_the_model_takes_is_invalid_for_it() -> None:
    backend = LocalDecoderBackend(ENGINE, SETTINGS.models)
    with pytest.raises(UpstreamError, match="zoo-small: the prompt has") as raised:
        await backend.complete(zoo("zoo-small"), envelope("reverse " + "a" * 60 + "="))
    await backend.close()
    assert raised.value.code is ErrorCode.INVALID and not raised.value.retryable

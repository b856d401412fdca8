"""The semantic cache through the whole pipeline: near-repeats are served within a tenant
and a context, never across tenants, and never as a stale turn of an agent loop.

Runs on both brokers: the Tansu pipeline embeds requests and has the semantic layer on,
the Kafka one has it off, and each test checks what its pipeline's settings promise.
"""

from __future__ import annotations

import uuid

import pytest

from llmflow.client import LLMFlowClient, new_request
from schemas.messages import ChatMessage, LLMRequest, LLMResponse, Role, Status
from tests.integration.conftest import RunningPipeline

pytestmark = pytest.mark.integration

ASKED = "How do I reverse a list in Python?"
PARAPHRASE = "How can I reverse a Python list?"  # cosine 0.979, the same guard terms


def tenant() -> str:
    """A fresh tenant per test, so no earlier run's cache entry can answer."""
    return f"acme-{uuid.uuid4().hex[:8]}"


async def ask(client: LLMFlowClient, request: LLMRequest) -> LLMResponse:
    return await client.call(request, timeout=120)


async def test_a_paraphrase_is_served_from_the_semantic_cache_when_it_is_on(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    owner = tenant()
    first = await ask(client, new_request(ASKED, owner))
    assert first.status is Status.OK
    again = await ask(client, new_request(PARAPHRASE, owner))
    if not pipeline.settings.semantic.enabled:
        assert again.status is Status.OK and again.cache_kind is None
        return
    assert again.status is Status.CACHED, again
    assert again.cache_kind == "semantic" and again.output == first.output
    assert again.cost_usd == 0.0


async def test_no_tenant_is_served_another_tenants_answer(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    await ask(client, new_request(ASKED, tenant()))
    for prompt in (ASKED, PARAPHRASE):
        response = await ask(client, new_request(prompt, tenant()))
        assert response.status is Status.OK, response  # a model call of its own
        assert response.cache_kind is None and response.merged_with is None


async def test_an_agent_loop_never_gets_a_stale_turn(client: LLMFlowClient) -> None:
    owner = tenant()

    def turn(tool_result: str) -> LLMRequest:
        messages = [
            ChatMessage(role=Role.USER, content="What is the weather in Oslo?"),
            ChatMessage(role=Role.ASSISTANT, content="Calling get_weather(Oslo)."),
            ChatMessage(role=Role.TOOL, content=tool_result, tool_call_id="call-1"),
            ChatMessage(role=Role.USER, content="Summarise the tool result for me."),
        ]
        return new_request("unused", owner, messages=messages)

    sunny = await ask(client, turn('{"sky": "sunny", "celsius": 21}'))
    rainy = await ask(client, turn('{"sky": "rain", "celsius": 9}'))
    assert sunny.status is Status.OK
    assert rainy.status is Status.OK and rainy.cache_kind is None, rainy

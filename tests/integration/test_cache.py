"""The semantic cache through the whole pipeline: near-repeats are served within a tenant
and a context, never across tenants, and never as a stale turn of an agent loop.

Runs on both brokers: the Tansu pipeline embeds requests and has the semantic layer on,
the Kafka one has it off, and each test checks what its pipeline's settings promise.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from llmflow.admin import create_topics
from llmflow.client import LLMFlowClient, new_request
from llmflow.warm import warm
from schemas.messages import ChatMessage, LLMRequest, LLMResponse, Role, Status, dump
from tests.integration.conftest import RunningPipeline
from topology.settings import TopicSpec

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


async def test_near_identical_requests_in_flight_merge_by_meaning_when_it_is_on(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    owner = tenant()
    asked, paraphrased = new_request(ASKED, owner), new_request(PARAPHRASE, owner)
    first, second = await asyncio.gather(ask(client, asked), ask(client, paraphrased))
    if not pipeline.settings.semantic.enabled:
        assert first.status is second.status is Status.OK
        return
    by_status = {first.status: first, second.status: second}
    assert set(by_status) == {Status.OK, Status.MERGED}, (first, second)
    leader, follower = by_status[Status.OK], by_status[Status.MERGED]
    assert follower.merge_kind == "semantic" and follower.merged_with == leader.id
    assert follower.output == leader.output and follower.cost_usd == 0.0


async def test_tenants_sending_the_same_prompts_at_once_share_nothing(
    client: LLMFlowClient,
) -> None:
    """An adversarial tenant replays another's exact and paraphrased prompts, at the same
    moment and afterwards: every answer it gets comes from its own requests."""
    owners = [tenant(), tenant()]
    requests = [new_request(p, t) for t in owners for p in (ASKED, ASKED, PARAPHRASE)]
    responses = await asyncio.gather(*(ask(client, r) for r in requests))
    tenant_of = {r.id: r.tenant for r in requests}
    for request, response in zip(requests, responses, strict=True):
        assert response.status in (Status.OK, Status.MERGED, Status.CACHED), response
        if response.merged_with is not None:
            assert tenant_of[response.merged_with] == request.tenant, response
    for owner in owners:
        paid = [
            response
            for request, response in zip(requests, responses, strict=True)
            if request.tenant == owner and response.status is Status.OK
        ]
        assert paid, f"tenant {owner} was served without a model call of its own"
    late = await ask(client, new_request(PARAPHRASE, tenant()))
    assert late.status is Status.OK and late.cache_kind is None and late.merged_with is None


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


async def test_warm_fills_the_cache_from_replayed_topics(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    """A request and its answer, replayed from topics of their own, answer the next ask;
    the answer is one no model here would give, so it can only come from the replay."""
    uid = uuid.uuid4().hex[:8]
    topics = pipeline.settings.topics.model_copy(
        update={
            "requests": TopicSpec(name=f"replay-requests-{uid}", partitions=2),
            "responses": TopicSpec(name=f"replay-responses-{uid}", partitions=2),
        }
    )
    replay = pipeline.settings.model_copy(update={"topics": topics})
    await create_topics(replay)
    owner = tenant()
    earlier = new_request(ASKED, owner)
    answer = LLMResponse(id=earlier.id, status=Status.OK, output=f"replayed {uid}", model="x")
    producer = AIOKafkaProducer(bootstrap_servers=replay.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topics.requests.name, dump(earlier))
        await producer.send_and_wait(topics.responses.name, dump(answer))
    finally:
        await producer.stop()
    report = await warm(replay, topics.requests.name, topics.responses.name, progress=False)
    assert (report.answered, report.sent) == (1, 1)
    await asyncio.sleep(1.0)  # the warm stage stores it while the next request travels
    again = await ask(client, new_request(ASKED, owner))
    assert again.status is Status.CACHED and again.output == answer.output, again
    if pipeline.settings.semantic.enabled:
        near = await ask(client, new_request(PARAPHRASE, owner))
        assert near.cache_kind == "semantic" and near.output == answer.output, near

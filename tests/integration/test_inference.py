"""Local ONNX models through the whole pipeline: batch, infer in ONNX Runtime, stream, answer.

Runs on Apache Kafka (two workers) and on Tansu (one worker), like test_pipeline.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from llmflow.client import LLMFlowClient, new_request
from models.tasks import check, make_items
from schemas.messages import ErrorCode, GenerationParams, Priority, Status, StreamChunk
from tests.integration.conftest import RunningPipeline
from tests.integration.test_pipeline import read_topic

pytestmark = pytest.mark.integration


async def test_zoo_models_answer_task_prompts_through_the_pipeline(
    client: LLMFlowClient,
) -> None:
    items = make_items("add", "easy", 6, seed=99, split="heldout")
    requests = [
        new_request(
            item.prompt,
            "acme",
            model="zoo-large",
            params=GenerationParams(max_tokens=8),
        )
        for item in items
    ]
    responses = await asyncio.gather(*(client.call(r, timeout=120) for r in requests))
    for response in responses:
        assert response.status is Status.OK, response
        assert response.model == "zoo-large"
        assert response.usage.completion_tokens > 0 and response.cost_usd > 0
    correct = sum(check(i, r.output or "") for i, r in zip(items, responses, strict=True))
    assert correct >= 5, [(i.prompt, r.output) for i, r in zip(items, responses, strict=True)]


async def test_a_streamed_zoo_answer_arrives_token_by_token(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    (item,) = make_items("reverse", "easy", 1, seed=5, split="heldout")
    request = new_request(item.prompt, "acme", model="zoo-small", stream=True)
    response = await client.call(request, timeout=120)
    assert response.status is Status.OK, response
    chunks = [
        StreamChunk.model_validate_json(v)
        for v in await read_topic(
            pipeline.settings.bootstrap_servers,
            pipeline.settings.topics.stream.name,
            wanted=100_000,
            timeout=5,
        )
    ]
    mine = sorted((c for c in chunks if c.id == request.id), key=lambda c: c.index)
    assert [c.index for c in mine] == list(range(len(mine)))
    assert mine[-1].done and not any(c.done for c in mine[:-1])
    assert len(mine) - 1 == response.usage.completion_tokens  # one chunk per generated token
    assert "".join(c.delta for c in mine) == response.output


async def test_a_deadline_the_batch_cannot_meet_is_answered_timeout(
    client: LLMFlowClient,
) -> None:
    request = new_request(
        f"reverse abcdefgh {uuid.uuid4().hex[:4]}=",
        "acme",
        model="zoo-large",
        priority=Priority.HIGH,
        deadline=time.time() + 0.001,
    )
    response = await client.call(request, timeout=60)
    assert response.status is Status.ERROR and response.error is not None
    assert response.error.code is ErrorCode.TIMEOUT

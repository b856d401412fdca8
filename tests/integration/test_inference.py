"""ONNX models in the whole pipeline: embeddings in preprocess; local decoders batched,
run in ONNX Runtime and streamed.

Runs on Apache Kafka (two workers) and on Tansu (one worker, embedding on), like
test_pipeline.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest

from inference.encoder import Encoder
from llmflow.client import LLMFlowClient, new_request
from models.tasks import check, make_items
from schemas.messages import (
    Envelope,
    GenerationParams,
    Status,
    decode_embedding,
)
from tests.integration.conftest import RunningPipeline, connected_client
from tests.integration.test_pipeline import read_topic, streamed_chunks

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
    request = new_request(
        item.prompt, "acme", model="zoo-small", stream=True, params=GenerationParams(max_tokens=16)
    )
    response = await client.call(request, timeout=120)
    assert response.status is Status.OK, response
    mine = await streamed_chunks(pipeline, request.id)
    assert [c.index for c in mine] == list(range(len(mine)))
    assert mine[-1].done and not any(c.done for c in mine[:-1])
    assert len(mine) - 1 == len(response.output or "")  # a chunk per character token
    assert "".join(c.delta for c in mine) == response.output


async def test_preprocess_embeds_the_last_user_turn(
    tansu_pipeline: RunningPipeline,
) -> None:
    settings = tansu_pipeline.settings
    assert settings.embedding.enabled and settings.fusion == "off"
    prompt = f"How should I size Kafka partitions for {uuid.uuid4().hex}?"
    request = new_request(prompt, "acme")
    async with connected_client(tansu_pipeline) as client:
        response = await client.call(request, timeout=60)
    assert response.status is Status.OK
    topic = settings.stage("ratelimit").topic.name  # preprocess's output, unfused
    envelopes = [
        Envelope.model_validate_json(value)
        for value in await read_topic(settings.bootstrap_servers, topic, 100_000, timeout=5)
    ]
    (mine, *_redelivered) = [e for e in envelopes if e.request.id == request.id]
    assert mine.embedding is not None
    vector = decode_embedding(mine.embedding)
    expected = Encoder(Path(settings.embedding.path)).embed([prompt])[0]
    assert vector.shape == expected.shape == (384,)
    assert float(vector @ expected) / float(np.linalg.norm(vector)) >= 0.999

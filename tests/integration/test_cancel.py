"""Cancellation and status over real brokers: a cancelled request is answered `cancelled`
exactly once wherever it was, the others finish normally; `llmflow status ID` shows
where a request went."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from llmflow.cli import main
from llmflow.client import LLMFlowClient, new_request, request_status
from schemas.messages import ErrorCode, LLMResponse, RequestStatus, Status
from tests.integration.conftest import PROVIDER_LATENCY_MS, RunningPipeline
from tests.integration.test_pipeline import read_topic, streamed_chunks

pytestmark = pytest.mark.integration
SLOW_MS = 6000


def configure_provider(pipeline: RunningPipeline, patch: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{pipeline.provider.base_url}/admin/config",
        data=json.dumps(patch).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


@pytest.fixture
async def slow_provider(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> AsyncIterator[Callable[[dict[str, Any]], None]]:
    """Lets a test slow the provider down; its latency is restored afterwards."""
    yield lambda patch: configure_provider(pipeline, patch)
    configure_provider(pipeline, {"latency_ms": PROVIDER_LATENCY_MS, "per_token_ms": 0.0})


async def status_until(
    pipeline: RunningPipeline, request_id: str, done: Callable[[RequestStatus], bool]
) -> RequestStatus:
    """The request's status record once `done` holds for it."""
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        found = await request_status(pipeline.settings, request_id)
        if found is not None and done(found):
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"the status of {request_id} never got there: {found}")


async def answers_to(pipeline: RunningPipeline, request_id: str) -> list[LLMResponse]:
    """Every response to `request_id` on the responses topic (more than one is a bug)."""
    values = await read_topic(
        pipeline.settings.bootstrap_servers,
        pipeline.settings.topics.responses.name,
        wanted=1_000_000,
        timeout=3,
    )
    responses = (LLMResponse.model_validate_json(v) for v in values)
    return [r for r in responses if r.id == request_id]


async def assert_cancelled_once(pipeline: RunningPipeline, response: LLMResponse) -> None:
    assert response.status is Status.ERROR and response.error is not None, response
    assert response.error.code is ErrorCode.CANCELLED, response
    assert len(await answers_to(pipeline, response.id)) == 1


async def test_a_request_waiting_on_a_slow_model_call_is_cancelled(
    pipeline: RunningPipeline,
    client: LLMFlowClient,
    slow_provider: Callable[[dict[str, Any]], None],
) -> None:
    slow_provider({"latency_ms": SLOW_MS})
    cancelled = new_request(f"cancel me {uuid.uuid4()}", "acme")
    other = new_request(f"let me be {uuid.uuid4()}", "acme")
    answer = await client.submit(cancelled)
    other_answer = await client.submit(other)
    await status_until(pipeline, cancelled.id, lambda s: "infer" in s.reached)
    await client.cancel(cancelled.id, "the agent moved on")
    response = await asyncio.wait_for(answer, 60)
    assert not other_answer.done(), "the cancelled call should not have waited for the model"
    assert response.error is not None and "the agent moved on" in response.error.message
    await assert_cancelled_once(pipeline, response)
    assert (await asyncio.wait_for(other_answer, 60)).status is Status.OK
    record = await status_until(pipeline, cancelled.id, lambda s: s.status is not None)
    assert record.error is ErrorCode.CANCELLED


async def test_a_follower_merged_behind_its_leader_is_cancelled(
    pipeline: RunningPipeline,
    client: LLMFlowClient,
    slow_provider: Callable[[dict[str, Any]], None],
) -> None:
    slow_provider({"latency_ms": SLOW_MS})
    prompt = f"merge then cancel {uuid.uuid4()}"
    leader = new_request(prompt, "acme")
    follower = new_request(prompt, "acme")
    calls_before = pipeline.provider_stats()["calls"]
    leader_answer = await client.submit(leader)
    await status_until(pipeline, leader.id, lambda s: "infer" in s.reached)
    follower_answer = await client.submit(follower)
    await status_until(pipeline, follower.id, lambda s: "preprocess" in s.reached)
    await asyncio.sleep(1.0)  # on to dedup, where it waits for the leader
    await client.cancel(follower.id)
    assert (await asyncio.wait_for(leader_answer, 60)).status is Status.OK
    await assert_cancelled_once(pipeline, await asyncio.wait_for(follower_answer, 60))
    assert pipeline.provider_stats()["calls"] - calls_before == 1


async def test_a_streaming_request_is_cancelled_mid_stream(
    pipeline: RunningPipeline,
    client: LLMFlowClient,
    slow_provider: Callable[[dict[str, Any]], None],
) -> None:
    slow_provider({"latency_ms": 100, "per_token_ms": 300.0})
    streaming = new_request(f"stream then cancel {uuid.uuid4()}", "acme", stream=True)
    other = new_request(f"stream it all {uuid.uuid4()}", "acme", stream=True)
    answer = await client.submit(streaming)
    other_answer = await client.submit(other)
    await status_until(pipeline, streaming.id, lambda s: "infer" in s.reached)
    await asyncio.sleep(2.0)  # a few words out
    await client.cancel(streaming.id)
    await assert_cancelled_once(pipeline, await asyncio.wait_for(answer, 60))
    assert (await asyncio.wait_for(other_answer, 60)).status is Status.OK
    chunks = await streamed_chunks(pipeline, streaming.id)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    words, last = chunks[:-1], chunks[-1]
    assert words and all(not c.done for c in words)
    assert last.done and last.error is not None and last.error.code is ErrorCode.CANCELLED
    assert len(words) < 32


async def test_status_shows_a_finished_requests_stages_and_model(
    pipeline: RunningPipeline, client: LLMFlowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    request = new_request(f"what happened to me {uuid.uuid4()}", "acme")
    response = await client.call(request, timeout=60)
    assert response.status is Status.OK
    await status_until(pipeline, request.id, lambda s: s.status is not None)
    capsys.readouterr()
    argv = ["status", request.id, "--bootstrap", pipeline.settings.bootstrap_servers]
    assert await asyncio.to_thread(main, argv) == 0
    shown = RequestStatus.model_validate_json(capsys.readouterr().out)
    assert {"preprocess", "infer", "respond"} <= set(shown.reached)
    assert shown.model == response.model and shown.status is Status.OK
    assert {"ratelimit", "dedup", "cache", "route", "batch"} <= set(shown.stage_latency_ms)


async def test_a_cancel_for_an_unknown_request_changes_nothing(client: LLMFlowClient) -> None:
    await client.cancel(f"nobody {uuid.uuid4()}")
    response = await client.call(new_request(f"still fine {uuid.uuid4()}", "acme"), timeout=60)
    assert response.status is Status.OK

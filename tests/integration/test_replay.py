"""Replay on Tansu and Redis: a pipeline's traffic sent again into a shadow namespace whose
worker routes by rules alone, then both runs evaluated side by side.

Both pipelines run in namespaces of their own (the session's Tansu pipeline may hold the
un-prefixed topics), each with its own Redis database, one after the other.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from evaluation.compare import task_item
from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.cli import main
from llmflow.client import LLMFlowClient, new_request
from llmflow.replay import Window, namespace_settings, replay, select_records
from llmflow.stack import SimulatedProvider, Workers
from models.tasks import check, make_items
from schemas.messages import GenerationParams, LLMRequest, LLMResponse, Status
from tests.integration.conftest import WORKER_START_S, pipeline_settings
from topology.settings import Settings

pytestmark = pytest.mark.integration

LIVE, SHADOW = "replay-live", "replay-shadow"
LIVE_REDIS_DB, SHADOW_REDIS_DB = 8, 9
ANSWER_TIMEOUT_S = 240.0


async def end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


def first_wave(tenant: str) -> list[LLMRequest]:
    """Zoo task prompts (checkable), then chat prompts. Requests are made as they are
    sent: latency starts at `created_at`."""
    items = make_items("add", "easy", 3, seed=31, split="heldout") + make_items(
        "reverse", "easy", 3, seed=31, split="heldout"
    )
    params = GenerationParams(max_tokens=16)
    tasks = [new_request(item.prompt, tenant, params=params) for item in items]
    # Chat answers get the default max_tokens: an answer cut at its limit is not cached.
    return tasks + [new_request(f"Tell me about topic {n}", tenant) for n in range(4)]


def repeats_of(chats: list[LLMRequest]) -> list[LLMRequest]:
    """Sent once the first wave is answered, so the live run serves them from its cache."""
    return [new_request(r.messages[0].content, r.tenant) for r in chats]


def correct(requests: list[LLMRequest], responses: dict[str, LLMResponse]) -> int:
    right = 0
    for request in requests:
        item = task_item(request.messages[0].content)
        if item is not None and responses[request.id].error is None:
            right += check(item, responses[request.id].output or "")
    return right


async def test_a_replay_into_a_rules_routed_shadow_is_evaluated_against_the_live_run(
    tansu_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    redis = redis_url.rsplit("/", 1)[0]
    base = pipeline_settings(tansu_bootstrap, f"{redis}/{LIVE_REDIS_DB}", provider)
    live = namespace_settings(base, LIVE)
    other = base.model_copy(
        update={
            "redis_url": f"{redis}/{SHADOW_REDIS_DB}",
            "route": base.route.model_copy(update={"policy": "rules"}),
        }
    )
    shadow = namespace_settings(other, SHADOW)
    await create_topics(live)
    with Workers(live, tmp_path / "live", 1):
        await wait_for_stable_group(live, 1, WORKER_START_S)
        async with LLMFlowClient(live) as client:
            first = first_wave(f"replay-{uuid.uuid4().hex[:8]}")
            answers = await asyncio.gather(*(client.call(r, ANSWER_TIMEOUT_S) for r in first))
            second_wave_at = time.time()
            repeats = repeats_of(first[-2:])
            answers += await asyncio.gather(*(client.call(r, ANSWER_TIMEOUT_S) for r in repeats))
    sent = first + repeats
    live_answers = {a.id: a for a in answers}
    live_status = Counter(a.status.value for a in answers)
    assert live_status[Status.CACHED.value] >= len(repeats), live_status
    assert any((a.model or "").startswith("zoo-") for a in answers), answers

    # A time range picks out the second wave alone.
    later = await select_records(
        tansu_bootstrap, live.topics.requests.name, Window(from_time=second_wave_at), False
    )
    assert sorted(r.key or b"" for r in later) == sorted(r.id.encode() for r in repeats)

    live_topics = [live.topics.requests.name, live.topics.responses.name]
    before = await end_offsets(live, live_topics)
    await create_topics(shadow)
    with Workers(shadow, tmp_path / "shadow", 1):
        await wait_for_stable_group(shadow, 1, WORKER_START_S)
        async with LLMFlowClient(shadow) as client:
            pending = [client.expect(r.id) for r in sent]
            report = await replay(live, shadow, Window(), speed=4.0, progress=False)
            assert (report.read, report.replayed, report.invalid) == (len(sent), len(sent), 0)
            shadow_list = await asyncio.wait_for(asyncio.gather(*pending), ANSWER_TIMEOUT_S)
            # Give a redelivered request time to be answered twice, should one be.
            await asyncio.sleep(2.0)
    shadow_answers = {a.id: a for a in shadow_list}
    assert await end_offsets(live, live_topics) == before

    out = tmp_path / "out"
    code = await asyncio.to_thread(
        main,
        [
            "evaluate",
            "--baseline",
            LIVE,
            "--candidate",
            SHADOW,
            "--bootstrap",
            tansu_bootstrap,
            "--json",
            str(out / "eval.json"),
            "--html",
            str(out / "eval.html"),
        ],
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    baseline, candidate = result["baseline"], result["candidate"]
    assert result["compared_ids"] == len(sent)
    for run in (baseline, candidate):
        assert (run["requests"], run["answered"], run["missing"]) == (len(sent), len(sent), 0)
        assert run["duplicate_answers"] == 0
        assert run["checkable"] == 6
    assert baseline["status"] == dict(live_status)
    assert baseline["correct"] == correct(sent, live_answers)
    assert candidate["status"] == dict(Counter(a.status.value for a in shadow_list))
    assert candidate["correct"] == correct(sent, shadow_answers)
    assert candidate["latency_from_replay"] == len(sent)
    assert not any(model.startswith("zoo-") for model in candidate["models"]), candidate
    assert sum(candidate["models"].values()) == len(sent)
    assert math.isclose(
        baseline["cost_usd"], sum(a.cost_usd for a in answers), rel_tol=1e-6, abs_tol=1e-7
    )
    page = (out / "eval.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3

"""Stage fusion on the embedded Tansu broker: by key, dedup, cache and route run in one
worker without Kafka hops between them; local, one worker that owns every partition runs
each request from preprocess to respond without a hop. Either way every request is still
answered once, duplicates merged and repeats served from the cache."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient, new_request, request_status
from llmflow.prompts import load_prompts
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import ErrorCode, Status
from tests.integration.conftest import WORKER_START_S, RunningPipeline, pipeline_settings
from tests.integration.test_pipeline import answer_all, answer_demo_workload, read_topic, scrape
from topology.settings import Fusion

pytestmark = pytest.mark.integration

REDIS_DB = 13
# The stages one worker that owns every partition reaches only in process.
LOCAL_SKIPPED = [
    "ratelimit",
    "dedup",
    "cache",
    "route",
    "batch",
    "postprocess",
    "respond",
    "status",
]


@pytest.fixture(scope="module", params=["key", "local"])
def fused(
    request: pytest.FixtureRequest,
    tansu_bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningPipeline]:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    fusion: Fusion = request.param
    settings = pipeline_settings(tansu_bootstrap, own_redis, provider).namespaced(f"{fusion}-")
    settings = settings.model_copy(update={"fusion": fusion})
    asyncio.run(create_topics(settings))
    run_dir = tmp_path_factory.mktemp(f"fusion-{fusion}")
    with Workers(settings, run_dir) as workers:
        asyncio.run(wait_for_stable_group(settings, 1, WORKER_START_S))
        yield RunningPipeline("tansu", settings, workers, provider)
        for log in sorted(run_dir.glob("worker-*.log")):
            print(f"--- {log.name} tail\n{log.read_text()[-3000:]}")


async def test_fused_stages_answer_each_request_once_without_their_hops(
    fused: RunningPipeline,
) -> None:
    settings = fused.settings
    async with LLMFlowClient(settings) as client:
        first, second = await answer_demo_workload(client, load_prompts(700)[640:], seed=11)
    assert all(fused.workers.alive())

    # Stage timings go on: a fused stage is timed as it is entered, as after a hop.
    answered = [r for r in first.values() if r.status is Status.OK]
    assert all({"dedup", "cache", "route"} <= set(r.stage_latency_ms) for r in answered)
    bootstrap = settings.bootstrap_servers
    # By key every request reaches dedup through its topic; local no stage topic is used.
    if settings.fusion == "key":
        topic = settings.stage("dedup").topic.name
        assert len(await read_topic(bootstrap, topic, 41, 30.0)) >= 41
    skipped = ["cache", "route"] if settings.fusion == "key" else LOCAL_SKIPPED
    for stage in skipped:
        assert await read_topic(bootstrap, settings.stage(stage).topic.name, 1, 5.0) == []
    (port,) = fused.workers.metrics_ports
    fused_sends: dict[str, float] = {}
    for (name, labels), value in scrape(port).items():
        if name == "llmflow_fused_sends_total":
            next_stage = dict(labels)["next_stage"]
            fused_sends[next_stage] = fused_sends.get(next_stage, 0.0) + value
    # Every request but a merged follower (parked in dedup) passed cache; the misses route.
    responses = [*first.values(), *second.values()]
    reached_cache = 1 + sum(r.status is not Status.MERGED for r in responses)
    assert fused_sends["cache"] == reached_cache, fused_sends
    assert fused_sends["route"] == 1 + len(answered), fused_sends
    if settings.fusion == "local":
        everyone = 1 + len(responses)  # the warm-up too
        assert fused_sends["ratelimit"] == everyone, fused_sends
        assert fused_sends["batch"] == 1 + len(answered), fused_sends
        assert fused_sends["respond"] == everyone, fused_sends
        assert fused_sends["postprocess"] >= 1 + len(answered), fused_sends
        # Accepted, its model call started, answered: each report recorded in process.
        assert fused_sends["status"] >= 2 * everyone + len(answered), fused_sends
    # Status records are read from the changelog partition of their request id, so a
    # report recorded in process wrote the right one.
    for response in answered[:5]:
        record = await request_status(settings, response.id)
        assert record is not None and record.status is Status.OK, record
        assert {"preprocess", "infer", "respond"} <= set(record.reached), record


async def test_followers_of_a_leader_out_of_its_own_time_lead_anew(
    fused: RunningPipeline,
) -> None:
    """They go back to dedup, where in process they would follow the ending entry again
    and be lost with it. Leaders with deadlines from 50 to 300 ms, so that in some rounds
    the followers are parked before their leader times out."""
    rounds = []
    for i in range(6):
        prompt = f"hurry {uuid.uuid4()}"
        leader = new_request(prompt, "acme", deadline=time.time() + 0.05 * (i + 1))
        rounds.append((leader, [new_request(prompt, "acme") for _ in range(3)]))
    everyone = [r for leader, patient in rounds for r in (leader, *patient)]
    async with LLMFlowClient(fused.settings) as client:
        answers = await answer_all(client, everyone, timeout=30.0)
    timed_out = 0
    for leader, patient in rounds:
        error = answers[leader.id].error
        timed_out += error is not None and error.code is ErrorCode.TIMEOUT
        for request in patient:
            answer = answers[request.id]
            assert answer.status in (Status.OK, Status.MERGED, Status.CACHED), answer
    assert timed_out >= 3, [answers[leader.id] for leader, _ in rounds]

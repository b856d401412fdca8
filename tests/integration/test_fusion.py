"""Stage fusion on the embedded Tansu broker: with `fusion` on, dedup, cache and route run
in one worker without Kafka hops between them, and every request is still answered once,
duplicates merged and repeats served from the cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient
from llmflow.prompts import load_prompts
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import Status
from tests.integration.conftest import WORKER_START_S, RunningPipeline, pipeline_settings
from tests.integration.test_pipeline import answer_demo_workload, read_topic, scrape

pytestmark = pytest.mark.integration

REDIS_DB = 13


@pytest.fixture(scope="module")
def fused(
    tansu_bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningPipeline]:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    settings = pipeline_settings(tansu_bootstrap, own_redis, provider).namespaced("fused-")
    settings = settings.model_copy(update={"fusion": True})
    asyncio.run(create_topics(settings))
    run_dir = tmp_path_factory.mktemp("fusion")
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
    dedup_topic = settings.stage("dedup").topic.name
    assert len(await read_topic(bootstrap, dedup_topic, 41, 30.0)) >= 41
    for stage in ("cache", "route"):
        assert await read_topic(bootstrap, settings.stage(stage).topic.name, 1, 5.0) == []
    (port,) = fused.workers.metrics_ports
    fused_sends = {
        dict(labels)["next_stage"]: value
        for (name, labels), value in scrape(port).items()
        if name == "llmflow_fused_sends_total"
    }
    # Every request but a merged follower (parked in dedup) passed cache; the misses route.
    reached_cache = 1 + sum(
        r.status is not Status.MERGED for r in [*first.values(), *second.values()]
    )
    assert fused_sends["cache"] == reached_cache, fused_sends
    assert fused_sends["route"] == 1 + len(answered), fused_sends

"""Workers split by deploy group, as docker-compose.yml runs them: one worker process per
group (edge, core, infer, respond) in one consumer group on the embedded Tansu broker,
each attaching only its group's stages, still answer every request exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient
from llmflow.prompts import load_prompts
from llmflow.stack import SimulatedProvider, Workers
from tests.integration.conftest import WORKER_START_S, pipeline_settings
from tests.integration.test_pipeline import answer_demo_workload, scrape
from topology.settings import DEPLOY_GROUPS, Settings

pytestmark = pytest.mark.integration

REDIS_DB = 6
# Stages a worker also times that are not its own topics: infer runs fused in batch, and
# postprocess times how long a merged follower waited for its leader.
EXTRA_TIMINGS = {"infer": {"infer"}, "core": {"merge_wait"}}


class GroupedPipeline:
    def __init__(self, settings: Settings, workers: dict[str, Workers]) -> None:
        self.settings = settings
        self.workers = workers

    def alive(self) -> bool:
        return all(all(w.alive()) for w in self.workers.values())


@pytest.fixture(scope="module")
def grouped(
    tansu_bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GroupedPipeline]:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    settings = pipeline_settings(tansu_bootstrap, own_redis, provider).namespaced("groups-")
    asyncio.run(create_topics(settings))
    run_dir: Path = tmp_path_factory.mktemp("stage-groups")
    with contextlib.ExitStack() as stack:
        workers = {
            group: stack.enter_context(
                Workers(
                    settings.model_copy(update={"worker_stages": list(stages)}), run_dir / group
                )
            )
            for group, stages in DEPLOY_GROUPS.items()
        }
        asyncio.run(wait_for_stable_group(settings, len(workers), WORKER_START_S))
        yield GroupedPipeline(settings, workers)
        for log in sorted(run_dir.glob("*/worker-*.log")):
            print(f"--- {log.parent.name}/{log.name} tail\n{log.read_text()[-3000:]}")


def timed_stages(port: int) -> set[str]:
    """The stages a worker has timed at least one request in."""
    return {
        dict(labels)["stage"]
        for (name, labels), value in scrape(port).items()
        if name == "llmflow_stage_latency_seconds_count" and value > 0
    }


async def test_one_worker_per_group_answers_each_request_once(grouped: GroupedPipeline) -> None:
    async with LLMFlowClient(grouped.settings) as client:
        await answer_demo_workload(client, load_prompts(600)[560:], seed=8)
    assert grouped.alive()

    for group, workers in grouped.workers.items():
        (port,) = workers.metrics_ports
        own = set(DEPLOY_GROUPS[group]) | EXTRA_TIMINGS.get(group, set())
        timed = timed_stages(port)
        assert timed, f"the {group} worker timed no stage"
        assert timed <= own, f"the {group} worker ran {sorted(timed - own)}"

"""The adaptive rate limit on Apache Kafka: injected load lowers a worker's scale, and with
it what a tenant is admitted, and the scale climbs back once the load stops.

The shared pipelines never let the controller act (their counts must not move), so this
runs its own worker, under its own app id and topic names, with a low queueing target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient, new_request
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import LLMResponse, Status
from tests.integration.conftest import (
    FROZEN_LIMIT,
    FROZEN_TENANT,
    WORKER_START_S,
    RunningPipeline,
    connected_client,
    pipeline_settings,
    requests_only,
)
from tests.integration.test_pipeline import scrape
from topology.settings import AdaptiveLimit, RateLimit, Settings

pytestmark = pytest.mark.integration

PROBE_TENANT = "probe"
# One request at once, refilled at 5/s: a 2 s window admits about 11 at full scale.
PROBE_LIMIT = RateLimit(burst=1, per_second=5)
PROBES = 20
PROBE_SPACING_S = 0.1
DEADLINE_S = 20.0
LOAD_IN_FLIGHT = 300


def adaptive_settings(bootstrap: str, redis_url: str, provider: SimulatedProvider) -> Settings:
    """The integration settings with a controller that acts within a second of load."""
    settings = pipeline_settings(bootstrap, redis_url, provider).namespaced("adaptive-")
    limits = settings.ratelimit
    ratelimit = limits.model_copy(
        update={
            "tenants": {**limits.tenants, PROBE_TENANT: requests_only(PROBE_LIMIT)},
            "adaptive": AdaptiveLimit(target_s=0.1, interval_s=0.2, increase=0.1),
        }
    )
    return settings.model_copy(update={"ratelimit": ratelimit})


def scale(port: int) -> float:
    return scrape(port)[("llmflow_ratelimit_scale", ())]


async def until_scale(port: int, wanted: Callable[[float], bool]) -> float:
    """Poll the worker's exported scale until `wanted` holds; fail past a generous deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not wanted(seen := scale(port)):
        assert time.monotonic() < deadline, f"scale stuck at {seen}"
        await asyncio.sleep(0.1)
    return seen


async def admitted_in_window(client: LLMFlowClient) -> int:
    """How many of a paced run of probe requests the probe tenant is admitted."""
    futures = []
    for _ in range(PROBES):
        request = new_request(f"probe {uuid.uuid4()}", PROBE_TENANT)
        futures.append(await client.submit(request))
        await asyncio.sleep(PROBE_SPACING_S)
    answers = await asyncio.wait_for(asyncio.gather(*futures), DEADLINE_S)
    return sum(answer.status is Status.OK for answer in answers)


@contextlib.asynccontextmanager
async def injected_load(client: LLMFlowClient) -> AsyncIterator[None]:
    """`LOAD_IN_FLIGHT` unanswered requests at all times, of a tenant refused all but its
    first burst: they stop at the rate limit stage, so the queue they keep is in a watched
    stage, is bounded (the probes behind it are answered) and the provider never sees them."""
    futures: list[asyncio.Future[LLMResponse]] = []
    slots = asyncio.Semaphore(LOAD_IN_FLIGHT)

    async def flood() -> None:
        while True:
            await slots.acquire()
            future = await client.submit(new_request(f"load {uuid.uuid4()}", FROZEN_TENANT))
            future.add_done_callback(lambda _: slots.release())
            futures.append(future)

    task = asyncio.create_task(flood())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        answers = await asyncio.wait_for(asyncio.gather(*futures), 3 * DEADLINE_S)
        assert sum(answer.status is Status.OK for answer in answers) <= FROZEN_LIMIT.burst
        print(f"injected {len(answers)} requests")


async def test_injected_load_lowers_the_scale_and_the_admitted_count(
    kafka_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/3"
    settings = adaptive_settings(kafka_bootstrap, own_redis, provider)
    await create_topics(settings)
    with Workers(settings, tmp_path) as workers:
        await wait_for_stable_group(settings, 1, WORKER_START_S)
        port = workers.metrics_ports[0]
        running = RunningPipeline("kafka", settings, workers, provider)
        async with connected_client(running) as client:
            await until_scale(port, lambda seen: seen == 1.0)
            calm = await admitted_in_window(client)
            async with injected_load(client):
                await until_scale(port, lambda seen: seen < 0.5)
                loaded = await admitted_in_window(client)
                lowest = scale(port)
            await until_scale(port, lambda seen: seen == 1.0)
    print(f"admitted calm {calm}, loaded {loaded}; scale under load {lowest}")
    assert lowest < 0.5
    assert loaded < calm

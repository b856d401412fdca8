"""Every worker stopped and new ones started on Apache Kafka: the rate-limit and cache
Tables come back from their changelogs, so no bucket refills and cached answers stay.

Kept in RocksDB the new workers reuse the old data dirs; kept in memory they start from
empty ones and only the changelog topics hold the state. The new workers get a fresh Redis
database, so a cached answer can come from the cache Table (L1) alone. With fusion `local`
a worker writes the Tables of the partitions it owns from the events of others, which must
reach the same partitions' changelogs, the only place the restarted workers find them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import new_request
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import ErrorCode, Status
from tests.integration.conftest import (
    WORKER_START_S,
    RunningPipeline,
    connected_client,
    pipeline_settings,
    requests_only,
)
from topology.settings import Fusion, RateLimit, Settings

pytestmark = pytest.mark.integration

WORKERS = 2
TENANT = "restarted"
# Five requests, and the refill would take over a quarter of an hour to add one more.
LIMIT = RateLimit(burst=5, per_second=0.001)
SPENT_BEFORE = 3
# Each run has two Redis databases of its own: the first run's, and an empty one after.
REDIS_DBS = {
    ("rocksdb://", "off"): (5, 6),
    ("memory://", "off"): (7, 8),
    ("memory://", "local"): (11, 12),
}


def restart_settings(
    kafka_bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    store: str,
    fusion: Fusion,
    db: int,
) -> Settings:
    """The integration settings in a namespace of their own, with TENANT's small bucket."""
    base = pipeline_settings(kafka_bootstrap, redis_url, provider, table_store=store)
    tenants = {**base.ratelimit.tenants, TENANT: requests_only(LIMIT)}
    settings = base.model_copy(
        update={
            "ratelimit": base.ratelimit.model_copy(update={"tenants": tenants}),
            "redis_url": f"{redis_url.rsplit('/', 1)[0]}/{db}",
            "fusion": fusion,
        }
    )
    return settings.namespaced(f"restart-{store[:-3]}-{fusion}-{uuid.uuid4().hex[:6]}.")


@contextlib.contextmanager
def running_pipeline(
    settings: Settings, run_dir: Path, provider: SimulatedProvider
) -> Iterator[RunningPipeline]:
    """Workers logging at INFO: a failure prints their rebalances and recoveries."""
    with Workers(settings, run_dir, WORKERS, loglevel="INFO") as workers:
        try:
            asyncio.run(wait_for_stable_group(settings, WORKERS, WORKER_START_S))
            yield RunningPipeline("kafka", settings, workers, provider)
        finally:
            for log in sorted(run_dir.glob("worker-*.log")):
                print(f"--- {run_dir.name}/{log.name} tail\n{log.read_text()[-6000:]}")


def ask_tenant(running: RunningPipeline, count: int) -> list[ErrorCode | None]:
    """TENANT's requests one at a time: each answer's error code, None when served."""

    async def asking() -> list[ErrorCode | None]:
        codes: list[ErrorCode | None] = []
        async with connected_client(running) as client:
            for _ in range(count):
                request = new_request(f"restart {uuid.uuid4()}", TENANT)
                response = await client.call(request, timeout=120)
                assert response.status is Status.OK or response.error is not None, response
                codes.append(response.error.code if response.error else None)
        return codes

    return asyncio.run(asking())


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("store", "fusion"), list(REDIS_DBS))
def test_tables_recover_when_every_worker_restarts(
    store: str,
    fusion: Fusion,
    kafka_bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    tmp_path: Path,
) -> None:
    first_db, fresh_db = REDIS_DBS[(store, fusion)]
    settings = restart_settings(kafka_bootstrap, redis_url, provider, store, fusion, first_db)
    asyncio.run(create_topics(settings))
    prompt = f"what survives a restart? {uuid.uuid4()}"

    async def cache_answers(running: RunningPipeline) -> list[tuple[Status, str | None]]:
        async with connected_client(running) as client:
            answers: list[tuple[Status, str | None]] = []
            for _ in range(2):
                response = await client.call(new_request(prompt, "cache-owner"), timeout=120)
                answers.append((response.status, response.cache_tier))
            return answers

    with running_pipeline(settings, tmp_path / "first", provider) as running:
        assert ask_tenant(running, SPENT_BEFORE) == [None] * SPENT_BEFORE
        assert asyncio.run(cache_answers(running)) == [(Status.OK, None), (Status.CACHED, "l1")]
        stopped = list(running.workers.processes)
    assert len(stopped) == WORKERS and all(p.poll() is not None for p in stopped)

    restarted = settings.model_copy(
        update={"redis_url": f"{redis_url.rsplit('/', 1)[0]}/{fresh_db}"}
    )
    second_dir = tmp_path / ("first" if store == "rocksdb://" else "second")
    with running_pipeline(restarted, second_dir, provider) as running:
        left = int(LIMIT.burst) - SPENT_BEFORE
        codes = ask_tenant(running, left + 2)
        # A reset bucket would have served all of them.
        assert codes == [None] * left + [ErrorCode.RATE_LIMITED] * 2, codes
        assert asyncio.run(cache_answers(running)) == [(Status.CACHED, "l1")] * 2

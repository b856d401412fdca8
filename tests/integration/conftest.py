"""Real brokers, a real Redis, the simulated provider and real workers, started per test run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.brokers import KafkaBroker, RedisServer, TansuBroker
from llmflow.client import LLMFlowClient, new_request
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import Status
from topology.settings import AdaptiveLimit, Fusion, Quota, RateLimit, Rates, Settings

# Concurrent duplicates merge only while their leader is still at the provider; on a
# loaded 2-core machine a hop can take a few hundred ms, so the provider takes longer.
PROVIDER_LATENCY_MS = 800
WORKER_START_S = 180.0
TINY_TENANT = "tiny"
TINY_LIMIT = RateLimit(burst=3, per_second=0.5)
FROZEN_TENANT = "frozen"
FROZEN_LIMIT = RateLimit(burst=2, per_second=0.001)
# Half of each bucket is kept for high priority; the refill is too slow to add a request.
EXACT_TENANT = "exact"
EXACT_QUOTA = Quota(
    tenant=Rates(requests=RateLimit(burst=6, per_second=0.001)),
    user=Rates(requests=RateLimit(burst=2, per_second=0.001)),
    reserve=0.5,
)


def requests_only(limit: RateLimit) -> Quota:
    """A tenant limited in requests alone, all of its bucket open to every priority."""
    return Quota(tenant=Rates(requests=limit), reserve=0.0)


@dataclass
class RunningPipeline:
    broker: str
    settings: Settings
    workers: Workers
    provider: SimulatedProvider

    def provider_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.provider.base_url}/stats", timeout=5) as reply:
            stats: dict[str, Any] = json.load(reply)
        return stats


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url or ""


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with KafkaBroker() as broker:
        yield broker.bootstrap or ""


@pytest.fixture(scope="session")
def tansu_bootstrap() -> Iterator[str]:
    with TansuBroker() as broker:
        yield broker.bootstrap or ""


@pytest.fixture(scope="session")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedProvider]:
    simulated = SimulatedProvider(
        tmp_path_factory.mktemp("provider"),
        ["--latency-ms", str(PROVIDER_LATENCY_MS), "--latency-jitter-ms", "20"],
    )
    simulated.start()
    yield simulated
    simulated.stop()


# Longer than any test's requests wait on a loaded machine; test_pipeline stamps one older.
SHED_QUEUED_MS = 300_000.0


def pipeline_settings(
    bootstrap: str,
    redis_url: str,
    provider: SimulatedProvider,
    embed: bool = False,
    table_store: str = "memory://",
) -> Settings:
    settings = Settings()
    ratelimit = settings.ratelimit.model_copy(
        update={
            "default": requests_only(RateLimit(burst=2000, per_second=1000)),
            "tenants": {
                TINY_TENANT: requests_only(TINY_LIMIT),
                FROZEN_TENANT: requests_only(FROZEN_LIMIT),
                EXACT_TENANT: EXACT_QUOTA,
            },
            # The controller runs and exports its scale, but a loaded test machine must
            # not lower the limits the tests count.
            "adaptive": AdaptiveLimit(target_s=3600.0),
        }
    )
    return settings.model_copy(
        update={
            "bootstrap_servers": bootstrap,
            "redis_url": redis_url,
            "provider_url": f"{provider.base_url}/v1",
            "ratelimit": ratelimit,
            "embedding": settings.embedding.model_copy(update={"enabled": embed}),
            "semantic": settings.semantic.model_copy(update={"enabled": embed}),
            "table_store": table_store,
            "limits": settings.limits.model_copy(update={"shed_queued_ms": SHED_QUEUED_MS}),
        }
    )


def pipeline_fixture(
    broker: str,
    workers: int,
    redis_db: int,
    embed: bool = False,
    table_store: str = "memory://",
    fusion: Fusion = "local",
) -> Any:
    """A session fixture running the whole pipeline on `broker` with `workers` workers;
    `embed` has preprocess embed every request and the cache serve near-repeats;
    `table_store` is where the workers keep their Tables; `fusion` as `Settings.fusion`."""

    @pytest.fixture(scope="session")
    def running_pipeline(
        request: pytest.FixtureRequest,
        redis_url: str,
        provider: SimulatedProvider,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[RunningPipeline]:
        bootstrap = request.getfixturevalue(f"{broker}_bootstrap")
        # Each broker's pipeline has its own Redis database, so no run sees another's cache.
        own_redis = f"{redis_url.rsplit('/', 1)[0]}/{redis_db}"
        settings = pipeline_settings(bootstrap, own_redis, provider, embed, table_store)
        settings = settings.model_copy(update={"fusion": fusion})
        asyncio.run(create_topics(settings))
        run_dir = tmp_path_factory.mktemp(f"workers-{broker}")
        with Workers(settings, run_dir, workers) as running:
            asyncio.run(wait_for_stable_group(settings, workers, WORKER_START_S))
            yield RunningPipeline(broker, settings, running, provider)
            for log in sorted(run_dir.glob("worker-*.log")):
                print(f"--- {log.name} tail ({broker})\n{log.read_text()[-3000:]}")

    return running_pipeline


# Apache Kafka runs the production shape: two workers keeping their Tables in RocksDB.
kafka_pipeline = pipeline_fixture("kafka", workers=2, redis_db=1, table_store="rocksdb://")
# One worker embeds every request on Tansu; on two CPU cores embedding a burst of 500
# takes seconds, which would turn the Kafka run's concurrent duplicates into cache hits.
# It hops between every stage, so the tests run the unfused path too (test_fusion runs
# fusion on Tansu).
tansu_pipeline = pipeline_fixture("tansu", workers=1, redis_db=2, embed=True, fusion="off")


@pytest.fixture(scope="session", params=["kafka", "tansu"])
def pipeline(request: pytest.FixtureRequest) -> RunningPipeline:
    running: RunningPipeline = request.getfixturevalue(f"{request.param}_pipeline")
    return running


@contextlib.asynccontextmanager
async def connected_client(pipeline: RunningPipeline) -> AsyncIterator[LLMFlowClient]:
    """A client whose first request has been answered, so the workers are up."""
    async with LLMFlowClient(pipeline.settings) as running:
        warm_up = new_request(f"warm-up {uuid.uuid4()}", "warm-up")
        warm = await running.call(warm_up, timeout=WORKER_START_S)
        assert warm.status is Status.OK, warm
        yield running


@pytest.fixture
async def client(pipeline: RunningPipeline) -> AsyncIterator[LLMFlowClient]:
    async with connected_client(pipeline) as running:
        yield running

"""Crashes on Apache Kafka under a steady stream of requests: a worker or a broker is
SIGKILLed mid-run and every request still gets its terminal answer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.kill import LoadRecord, load_limits, steady_load, trail
from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.brokers import KafkaBroker
from llmflow.client import LLMFlowClient, new_request
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import Status
from tests.integration.conftest import WORKER_START_S, pipeline_settings
from topology.settings import Settings

pytestmark = pytest.mark.integration

RATE = 10.0  # requests a second: what two workers keep up with on a loaded 2-core machine
DURATION_S = 20.0
KILL_AFTER_S = 6.0
ANSWER_S = 240.0
SESSION_TIMEOUT_S = 10.0


def fault_settings(
    bootstrap: str, redis_url: str, provider: SimulatedProvider, name: str
) -> Settings:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/8"
    settings = pipeline_settings(bootstrap, own_redis, provider).namespaced(f"{name}-")
    return load_limits(settings, RATE).model_copy(update={"session_timeout_s": SESSION_TIMEOUT_S})


async def run_with_kill(
    settings: Settings, workers: Workers, kill: Callable[[], None], label: str
) -> LoadRecord:
    await wait_for_stable_group(settings, workers.count, WORKER_START_S)
    async with LLMFlowClient(settings) as client:
        warm = await client.call(new_request(f"warm-up {uuid.uuid4()}"), WORKER_START_S)
        assert warm.status is Status.OK, warm
        record = await steady_load(client, RATE, DURATION_S, KILL_AFTER_S, kill, ANSWER_S, label)
    print(f"{label}: {json.dumps(record.summary())}")
    return record


async def assert_all_answered(settings: Settings, record: LoadRecord, run_dir: Path) -> None:
    """Every request answered with its model's answer: `ok`, or `cached` where the killed
    worker had cached the answer but not sent it and the survivor read the request again;
    a lost one is reported with its trail through the topics (read while the brokers still
    run)."""
    assert record.killed_at is not None
    missing = record.unanswered()
    assert not missing, (
        f"{len(missing)} of {len(record.sent)} unanswered; logs in {run_dir}; "
        f"trails: {await trail(settings, missing)}"
    )
    answers = {Status.OK.value, Status.CACHED.value}
    failed = {s: n for s, n in record.statuses.items() if s not in answers}
    assert not failed, failed


@pytest.mark.timeout(600)
async def test_a_killed_worker_loses_no_request(
    kafka_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    settings = fault_settings(kafka_bootstrap, redis_url, provider, "kill-worker")
    await create_topics(settings)
    with Workers(settings, tmp_path, 2) as workers:
        record = await run_with_kill(settings, workers, workers.processes[0].kill, "kill worker")
        assert workers.alive() == [False, True]
        await assert_all_answered(settings, record, tmp_path)
    assert record.backlog_s() is not None


@pytest.mark.timeout(600)
async def test_exactly_once_a_killed_worker_answers_every_request_once(
    kafka_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    """In transactions the survivor redoes only what the dead worker had not committed, and
    the client reads committed answers only: each request is answered ok, once."""
    settings = fault_settings(kafka_bootstrap, redis_url, provider, "kill-worker-eos")
    settings = settings.model_copy(update={"processing_guarantee": "exactly_once"})
    await create_topics(settings)
    with Workers(settings, tmp_path, 2) as workers:
        record = await run_with_kill(
            settings, workers, workers.processes[0].kill, "kill worker, exactly once"
        )
        assert workers.alive() == [False, True]
        await assert_all_answered(settings, record, tmp_path)
    assert record.duplicates == 0


@pytest.mark.timeout(600)
async def test_a_killed_broker_of_three_loses_no_request(
    redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    with KafkaBroker(tmp_path / "kafka", nodes=3) as cluster:
        settings = fault_settings(cluster.bootstrap or "", redis_url, provider, "kill-broker")
        settings = settings.model_copy(update={"replication_factor": 3})
        await create_topics(settings)
        with Workers(settings, tmp_path, 1) as workers:
            record = await run_with_kill(
                settings, workers, lambda: cluster.kill_node(2), "kill broker"
            )
            assert workers.alive() == [True]
        await assert_all_answered(settings, record, tmp_path)

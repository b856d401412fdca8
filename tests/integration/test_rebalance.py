"""Scaling out on Apache Kafka: a third worker joins two under a steady stream of requests,
the consumer group moves partitions to it, and every request is still answered once from
the client's point of view (a redelivered one may be answered twice; the client keeps the
first and counts the rest)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from prometheus_client import REGISTRY

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient, new_request
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import LLMResponse, Status
from streams.forecast import RequestOffsets, run_scaler
from tests.integration.conftest import WORKER_START_S, pipeline_settings
from topology.settings import DEPLOY_GROUPS, Settings, TopicSpec

pytestmark = pytest.mark.integration

REDIS_DB = 7
PACE_S = 0.2  # five requests a second
BEFORE = 25  # sent with two workers, before the third starts
AFTER = 25  # sent once the group is stable with three
ANSWER_S = 300.0
PARTITIONS = 6

Assignment = dict[str, set[tuple[str, int]]]


async def describe(admin: AIOKafkaAdminClient, group: str) -> tuple[str, Assignment]:
    """The group's state and each member's assigned partitions, as the broker has them."""
    state, members = "Unknown", {}
    for response in await admin.describe_consumer_groups([group]):
        for described in response.groups:
            state, group_members = described[2], described[5]
            for member_id, _client, _host, _metadata, raw in group_members:
                decoded = ConsumerProtocolMemberAssignment.decode(raw) if raw else None
                pairs = decoded.assignment if decoded else []
                members[member_id] = {(topic, p) for topic, parts in pairs for p in parts}
    return state, members


def with_partitions(settings: Settings, count: int) -> Settings:
    """`count` partitions for every topic of more than one (learn keeps its one). faust's
    assignor is sticky and gives a worker at most ceil(partitions / workers) of a topic:
    with 4, two workers keep 2 each and a third gets none, so this test uses 6, which three
    share 2 each."""

    def widen(topic: TopicSpec) -> TopicSpec:
        return topic.model_copy(update={"partitions": count}) if topic.partitions > 1 else topic

    topics = {
        name: widen(getattr(settings.topics, name)) for name in type(settings.topics).model_fields
    }
    stages = [s.model_copy(update={"topic": widen(s.topic)}) for s in settings.stages]
    return settings.model_copy(
        update={"topics": settings.topics.model_copy(update=topics), "stages": stages}
    )


def source_partitions(settings: Settings) -> set[tuple[str, int]]:
    """The partitions the workers consume requests from: the requests and stage topics
    (learn's single partition aside)."""
    topics = [settings.topics.requests, *(s.topic for s in settings.stages)]
    return {(t.name, p) for t in topics if t.partitions > 1 for p in range(t.partitions)}


def owners(assignment: Assignment, wanted: set[tuple[str, int]]) -> Counter[tuple[str, int]]:
    return Counter(tp for parts in assignment.values() for tp in parts if tp in wanted)


def print_logs(run_dir: Path) -> None:
    for log in sorted(run_dir.glob("worker-*.log")):
        print(f"--- {log.name} tail\n{log.read_text()[-2000:]}")


@pytest.mark.timeout(900)
async def test_a_third_worker_takes_partitions_and_every_request_is_answered_once(
    kafka_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    settings = with_partitions(
        pipeline_settings(kafka_bootstrap, own_redis, provider).namespaced("rebalance-"), PARTITIONS
    )
    await create_topics(settings)
    wanted = source_partitions(settings)
    offsets = RequestOffsets(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await offsets.start()
    await admin.start()
    try:
        published_before = await offsets.total()
        with Workers(settings, tmp_path, 2) as workers:
            await wait_for_stable_group(settings, 2, WORKER_START_S)
            _, two = await describe(admin, settings.app_id)
            assert len(two) == 2
            assert owners(two, wanted) == Counter(wanted), "each partition has one owner"

            async with LLMFlowClient(settings) as client:
                warm = await client.call(new_request(f"warm-up {uuid.uuid4()}"), WORKER_START_S)
                assert warm.status is Status.OK, warm
                answers: dict[str, asyncio.Future[LLMResponse]] = {}

                async def send() -> None:
                    request = new_request(f"rebalance {len(answers)} {uuid.uuid4()}", "scale")
                    answers[request.id] = await client.submit(request)
                    await asyncio.sleep(PACE_S)

                for _ in range(BEFORE):
                    await send()
                workers.start_one()
                # Keep the stream going through the third worker's start and the rebalance.
                deadline = time.monotonic() + WORKER_START_S
                state, three = await describe(admin, settings.app_id)
                while not (state == "Stable" and len(three) == 3):
                    assert time.monotonic() < deadline, f"group is {state} with {len(three)}"
                    assert all(workers.alive()), f"a worker exited; logs in {tmp_path}"
                    await send()
                    state, three = await describe(admin, settings.app_id)
                during = len(answers) - BEFORE
                for _ in range(AFTER):
                    await send()

                done, pending = await asyncio.wait(answers.values(), timeout=ANSWER_S)
                assert not pending, f"{len(pending)} of {len(answers)} requests got no answer"
                responses = {f.result().id: f.result() for f in done}
                assert set(responses) == set(answers)
                failed = [r for r in responses.values() if r.error is not None]
                assert not failed, failed[:3]
                duplicates = client.duplicates

            _, final = await describe(admin, settings.app_id)
            published = await offsets.total() - published_before
            forecaster = await run_scaler(settings, rounds=1)
        print_logs(tmp_path)
    finally:
        await admin.close()
        await offsets.stop()

    print(
        f"rebalance: {len(answers)} requests ({BEFORE} before the third worker, {during} "
        f"while it joined, {AFTER} after), {duplicates} duplicate answers dropped by the client"
    )
    assert final == three, "the group moved again after it was stable"
    assert len(three) == 3
    assert owners(three, wanted) == Counter(wanted), "each partition has exactly one owner"
    for parts in three.values():
        held = {p for _, p in parts & wanted}
        assert len(held) == PARTITIONS // 3, f"shares are uneven: {three}"
    new = set(three) - set(two)
    assert len(new) == 1 and three[new.pop()] & wanted, "the new worker took partitions"
    assert published == len(answers) + 1  # the scaler's offset reader counts every request
    assert forecaster.current_rate() == 0.0  # one sample: no whole minute seen yet
    for group in DEPLOY_GROUPS:
        exported = REGISTRY.get_sample_value("llmflow_predicted_replicas", {"group": group})
        assert exported == settings.scaler.groups[group].min_replicas

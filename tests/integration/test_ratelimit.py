"""Rate limits on Apache Kafka with two workers: exact, whichever worker a request meets."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from llmflow.client import new_request
from schemas.messages import ErrorCode, LLMResponse, Priority, Status
from tests.integration.conftest import EXACT_QUOTA, EXACT_TENANT, RunningPipeline, connected_client
from tests.integration.test_pipeline import answer_all, scrape

pytestmark = pytest.mark.integration


def allowed_per_user(answers: dict[str, LLMResponse], users: dict[str, str]) -> Counter[str]:
    for response in answers.values():
        refused = response.error is not None and response.error.code is ErrorCode.RATE_LIMITED
        assert response.status is Status.OK or refused, response
        if refused:
            assert response.error is not None and response.error.retry_after_s is not None
            assert response.error.retry_after_s > 0
    return Counter(users[rid] for rid, r in answers.items() if r.status is Status.OK)


async def test_limits_are_exact_across_two_workers(kafka_pipeline: RunningPipeline) -> None:
    """3x the burst at once, normal priority first, then high: normal gets exactly the part
    outside the reserve (one per user), high exactly the rest, and nothing more."""
    assert kafka_pipeline.workers.count == 2
    burst = EXACT_QUOTA.tenant.requests
    assert burst is not None
    normal_share = int(burst.burst * (1 - EXACT_QUOTA.reserve))
    async with connected_client(kafka_pipeline) as client:
        for priority, count in ((Priority.NORMAL, 2 * int(burst.burst)), (Priority.HIGH, 6)):
            users: dict[str, str] = {}
            requests = []
            for i in range(count):
                user = f"{priority}-{i % 4}"
                request = new_request(
                    f"exact {uuid.uuid4()}", EXACT_TENANT, user=user, priority=priority
                )
                users[request.id] = user
                requests.append(request)
            allowed = allowed_per_user(await answer_all(client, requests), users)
            if priority is Priority.NORMAL:
                assert sum(allowed.values()) == normal_share
                assert max(allowed.values()) == 1  # a user's own bucket keeps half for high
            else:
                assert sum(allowed.values()) == int(burst.burst) - normal_share


async def test_workers_export_the_adaptive_scale(kafka_pipeline: RunningPipeline) -> None:
    scales = [
        value
        for port in kafka_pipeline.workers.metrics_ports
        for (name, _labels), value in scrape(port).items()
        if name == "llmflow_ratelimit_scale"
    ]
    assert len(scales) == 2 and all(scale == 1.0 for scale in scales)

"""Learning from feedback on Tansu with a real Redis: feedback that the small model is wrong
on reverse tasks trains a candidate router model, the worker hot-reloads it and routes
the candidate's share of reverse tasks to the large model, and once feedback says the
candidate's answers are worse than the incumbent's it is rolled back on its own.

It runs its own worker under its own app id and topic names, with a rollout small enough
to finish in a test: a candidate after 24 examples, steps of 50 % then 100 %, judged on 8
events an arm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agents.rollout import in_candidate_share
from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.client import LLMFlowClient, new_request
from llmflow.stack import SimulatedProvider, Workers
from models.tasks import make_items
from schemas.messages import FeedbackEvent, GenerationParams, LLMRequest, LLMResponse, Status
from tests.integration.conftest import (
    WORKER_START_S,
    RunningPipeline,
    connected_client,
    pipeline_settings,
)
from tests.integration.test_pipeline import scrape
from topology.settings import Settings

pytestmark = pytest.mark.integration

REDIS_DB = 10
TENANT = "learner"
TRAIN_AFTER = 24
PER_ARM = 8
SHARE = 0.5
DEADLINE_S = 120.0


def feedback_settings(bootstrap: str, redis_url: str, provider: SimulatedProvider) -> Settings:
    settings = pipeline_settings(bootstrap, redis_url, provider).namespaced("feedback-")
    feedback = settings.feedback.model_copy(
        update={
            "train_after": TRAIN_AFTER,
            "train_steps": 150,
            "steps": [SHARE, 1.0],
            "min_samples": PER_ARM,
            "min_events_per_step": PER_ARM,
            "margin": 0.05,
        }
    )
    return settings.model_copy(update={"feedback": feedback})


class Prompts:
    """Distinct easy reverse tasks, each asked once so no cache or merge answers it."""

    def __init__(self) -> None:
        items = make_items("reverse", "easy", 400, seed=77, split="heldout")
        self.left = list(dict.fromkeys(item.prompt for item in items))

    def take(self) -> str:
        return self.left.pop()


async def ask(
    client: LLMFlowClient, prompts: Prompts, count: int, arm: Callable[[str], bool] | None = None
) -> list[LLMResponse]:
    """`count` reverse tasks routed by the classifier, with ids in the arm `arm` picks."""
    requests: list[LLMRequest] = []
    while len(requests) < count:
        request = new_request(prompts.take(), TENANT, params=GenerationParams(max_tokens=16))
        if arm is None or arm(request.id):
            requests.append(request)
    answers = await asyncio.gather(*(client.call(r, timeout=DEADLINE_S) for r in requests))
    assert all(a.status is Status.OK for a in answers), answers
    return list(answers)


async def tell(client: LLMFlowClient, answers: list[LLMResponse], correct: bool) -> None:
    for answer in answers:
        await client.feedback(FeedbackEvent(request_id=answer.id, tenant=TENANT, correct=correct))


def metric(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


async def until(port: int, wanted: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not wanted():
        if time.monotonic() > deadline:
            learning = {k: v for k, v in scrape(port).items() if "router_model" in k[0]}
            raise AssertionError(f"{what}: not seen in {DEADLINE_S} s; {learning}")
        await asyncio.sleep(0.2)


def in_share(request_id: str) -> bool:
    return in_candidate_share(request_id, SHARE)


def not_in_share(request_id: str) -> bool:
    return not in_candidate_share(request_id, SHARE)


async def test_feedback_trains_a_candidate_workers_reload_and_a_worse_one_rolls_back(
    tansu_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    settings = feedback_settings(tansu_bootstrap, own_redis, provider)
    await create_topics(settings)
    prompts = Prompts()
    with Workers(settings, tmp_path) as workers:
        await wait_for_stable_group(settings, 1, WORKER_START_S)
        port = workers.metrics_ports[0]
        share = "llmflow_router_model_candidate_share"
        rollouts = "llmflow_router_model_rollouts_total"
        running = RunningPipeline("tansu", settings, workers, provider)
        async with connected_client(running) as client:
            first = await ask(client, prompts, TRAIN_AFTER)
            assert {a.model for a in first} == {"zoo-small"}
            await tell(client, first, correct=False)
            await until(port, lambda: metric(port, share) == SHARE, "candidate published")
            assert metric(port, rollouts, event="published") == 1
            assert metric(port, "llmflow_router_model_reloads_total") >= 1

            candidate_arm = await ask(client, prompts, PER_ARM, in_share)
            incumbent_arm = await ask(client, prompts, PER_ARM, not_in_share)
            assert {a.model for a in candidate_arm} == {"zoo-large"}
            assert {a.model for a in incumbent_arm} == {"zoo-small"}

            # The candidate made worse: its answers are called wrong, the incumbent's right.
            await tell(client, incumbent_arm, correct=True)
            await tell(client, candidate_arm, correct=False)
            await until(port, lambda: metric(port, rollouts, event="rolled_back") == 1, "rollback")
            assert metric(port, share) == 0.0
            assert metric(port, rollouts, event="adopted") == 0
            after = await ask(client, prompts, PER_ARM, in_share)
            assert {a.model for a in after} == {"zoo-small"}
            joined = {
                (arm, outcome): metric(
                    port, "llmflow_router_model_feedback_total", arm=arm, outcome=outcome
                )
                for arm, outcome in (
                    ("incumbent", "bad"),
                    ("incumbent", "good"),
                    ("candidate", "bad"),
                )
            }
    print(f"feedback joined per arm and outcome: {joined}")
    assert joined == {
        ("incumbent", "bad"): TRAIN_AFTER,
        ("incumbent", "good"): PER_ARM,
        ("candidate", "bad"): PER_ARM,
    }

"""The A/B split, the rollout controller's steps and rollback, and hot reload in the Router."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents.rollout import RolloutController, RouterVersions, in_candidate_share, router_model
from agents.route import Router
from inference.complexity import features
from inference.router_training import TrainingParams, train_version
from schemas.messages import (
    ChatMessage,
    Envelope,
    GenerationParams,
    LLMRequest,
    Role,
    RouterModelsState,
)
from topology.settings import ZOO, FeedbackSettings, Settings

REVERSE = [f"reverse {w}=" for w in ("abc", "hello", "stream", "kafka", "zyxw", "queue")]


def controller(**update: object) -> RolloutController:
    settings = FeedbackSettings(min_samples=10, min_events_per_step=20, margin=0.05)
    return RolloutController(settings.model_copy(update=update))


def feed(rollout: RolloutController, candidate: bool, good: int, bad: int) -> None:
    for outcome in [True] * good + [False] * bad:
        rollout.observe(candidate, outcome)


def test_the_split_is_stable_nested_and_near_the_share() -> None:
    ids = [f"req-{i}" for i in range(4000)]
    quarter = [i for i in ids if in_candidate_share(i, 0.25)]
    assert 0.22 < len(quarter) / len(ids) < 0.28
    assert quarter == [i for i in ids if in_candidate_share(i, 0.25)]
    assert set(i for i in ids if in_candidate_share(i, 0.05)) <= set(quarter)
    assert not any(in_candidate_share(i, 0.0) for i in ids)
    assert all(in_candidate_share(i, 1.0) for i in ids)


def test_a_candidate_as_good_is_promoted_step_by_step_to_adoption() -> None:
    rollout = controller()
    rollout.start("v2")
    shares = [rollout.share]
    adopted = False
    while not adopted:
        assert rollout.decide() == "hold"
        feed(rollout, True, good=18, bad=2)
        feed(rollout, False, good=17, bad=3)
        assert rollout.decide() == "promote"
        adopted = rollout.promote()
        shares.append(rollout.share)
    assert shares == [0.05, 0.25, 0.5, 1.0]


def test_a_worse_candidate_is_rolled_back_once_there_are_enough_samples() -> None:
    rollout = controller()
    rollout.start("v2")
    feed(rollout, True, good=2, bad=7)
    feed(rollout, False, good=9, bad=0)
    assert rollout.decide() == "hold"  # nine each: too few to judge
    feed(rollout, True, good=0, bad=1)
    feed(rollout, False, good=1, bad=0)
    assert rollout.worse_z() > rollout.settings.z_critical
    assert rollout.decide() == "rollback"


def test_a_candidate_worse_within_the_margin_or_not_significantly_is_not_rolled_back() -> None:
    rollout = controller()
    rollout.start("v2")
    feed(rollout, True, good=17, bad=3)
    feed(rollout, False, good=18, bad=2)
    assert rollout.decide() == "promote"
    noisy = controller(margin=0.0)
    noisy.start("v2")
    feed(noisy, True, good=7, bad=3)
    feed(noisy, False, good=9, bad=1)
    assert noisy.decide() == "hold"


def request(request_id: str, prompt: str) -> Envelope:
    message = ChatMessage(role=Role.USER, content=prompt)
    params = GenerationParams(max_tokens=16)
    llm = LLMRequest(id=request_id, tenant="acme", messages=[message], params=params)
    return Envelope(request=llm, prompt_tokens=len(prompt))


@pytest.fixture(scope="module")
def worse_on_reverse() -> bytes:
    """The committed classifier told zoo-small answers every reverse prompt wrong."""
    base = (ZOO / "classifier" / "model.onnx").read_bytes()
    x = features(REVERSE)
    zeros = np.zeros(len(x))
    return train_version(base, x, zeros.astype(np.int64), zeros, TrainingParams(steps=100))


def test_routers_reload_a_candidate_for_its_share_and_drop_it_on_rollback(
    tmp_path: Path, worse_on_reverse: bytes
) -> None:
    versions = RouterVersions(ZOO / "classifier", tmp_path)
    router = Router(Settings(), None, seed=0)
    versions.listen(router.use)
    base = router_model(versions.incumbent.onnx)
    ids = [f"r{i}" for i in range(40)]
    assert {router.choose(request(i, "reverse abcd=")).model for i in ids} == {"zoo-small"}

    candidate = router_model(worse_on_reverse)
    versions.apply(
        RouterModelsState(
            incumbent=base, candidate=candidate, candidate_share=0.5, event="published"
        )
    )
    for i in ids:
        choice = router.choose(request(i, "reverse abcd="))
        in_share = in_candidate_share(i, 0.5)
        assert choice.candidate is in_share
        assert choice.version == (candidate.version if in_share else base.version)
        assert choice.model == ("zoo-large" if in_share else "zoo-small")
    assert router.candidate is not None and router.candidate.onnx == worse_on_reverse
    assert not any(tmp_path.iterdir())  # loaded into memory, nothing left on disk

    versions.apply(RouterModelsState(incumbent=base, event="rolled_back"))
    assert {router.choose(request(i, "reverse abcd=")).model for i in ids} == {"zoo-small"}
    assert router.candidate is None

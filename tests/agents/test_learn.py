"""The learner: enough feedback trains a candidate at the first share; the candidate's
arm against the incumbent's promotes it to adoption or rolls it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.learn import Learner
from agents.rollout import RouterVersions
from inference.complexity import prompt_features
from schemas.messages import LabelledExample, RoutedRecord
from topology.settings import ZOO, FeedbackSettings

SETTINGS = FeedbackSettings(
    train_after=30,
    train_steps=100,
    steps=[0.5, 1.0],
    min_samples=10,
    min_events_per_step=10,
    margin=0.05,
)


def example(
    i: int, version: str, candidate: bool, good: bool, model: str = "zoo-small"
) -> LabelledExample:
    prompt = f"reverse {'abcdefgh'[: 3 + i % 5]}{i}="
    routed = RoutedRecord(
        request_id=f"r{i}",
        tenant="acme",
        model=model,
        version=version,
        candidate=candidate,
        features=prompt_features(prompt).tolist(),
    )
    return LabelledExample(routed=routed, good=good)


@pytest.fixture
def learner(tmp_path: Path) -> Learner:
    return Learner(SETTINGS, RouterVersions(ZOO / "classifier", tmp_path))


def published(learner: Learner) -> str:
    """Feed wrong answers of zoo-small on reverse until a candidate is published."""
    base = learner.versions.incumbent.version
    states = [learner.add(example(i, base, False, good=False)) for i in range(30)]
    assert states[:-1] == [None] * 29
    state = states[-1]
    assert state is not None and state.event == "published" and state.candidate is not None
    assert state.candidate_share == 0.5 and state.incumbent.version == base
    learner.versions.apply(state)
    return state.candidate.version


def test_a_better_candidate_is_promoted_then_adopted(learner: Learner) -> None:
    base, candidate = learner.versions.incumbent.version, published(learner)
    state = None
    for i in range(100, 110):
        assert state is None
        learner.add(example(i, base, False, good=False))
        state = learner.add(example(i + 50, candidate, True, good=True, model="zoo-large"))
    assert state is not None and state.event == "adopted"
    assert state.incumbent.version == candidate and state.candidate is None


def test_a_worse_candidate_is_rolled_back(learner: Learner) -> None:
    base, candidate = learner.versions.incumbent.version, published(learner)
    state = None
    for i in range(100, 110):
        assert state is None
        learner.add(example(i, base, False, good=True))
        state = learner.add(example(i + 50, candidate, True, good=False, model="zoo-large"))
    assert state is not None and state.event == "rolled_back"
    assert state.incumbent.version == base and state.candidate is None


def test_feedback_of_other_versions_does_not_judge_the_candidate(learner: Learner) -> None:
    published(learner)
    for i in range(100, 140):
        assert learner.add(example(i, "stale", i % 2 == 0, good=i % 2 == 1)) is None
    assert learner.controller.candidate.total == learner.controller.incumbent.total == 0

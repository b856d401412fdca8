"""The ensemble's weighted vote, its combined result, and the runner sampling N answers."""

from __future__ import annotations

import pytest

from agents.ensemble import ENSEMBLE, combine, vote
from agents.infer import InferenceRunner
from schemas.messages import (
    ChatMessage,
    Envelope,
    GenerationParams,
    LLMRequest,
    Result,
    Role,
    Status,
    Usage,
)
from tests.agents.test_infer import FakeBackend, settings


def test_vote_takes_the_majority_and_says_how_many_agree() -> None:
    assert vote(["138790", " 138790\n", "139790"]) == pytest.approx(("138790", 2 / 3))
    assert vote(["a", "b"]) == ("a", 0.5), "a tie goes to the first answer"


def test_vote_weighs_answers() -> None:
    assert vote(["a", "b", "b"], [0.9, 0.3, 0.3]) == pytest.approx(("a", 0.6))


def test_weights_that_sum_to_nothing_count_alike() -> None:
    assert vote(["a", "b", "b"], [0.0, 0.0, 0.0]) == pytest.approx(("b", 2 / 3))


def sampled(output: str, confidence: float | None) -> Result:
    usage = Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
    return Result(
        output=output, model="zoo-small", usage=usage, cost_usd=0.001, confidence=confidence
    )


def test_combine_bills_every_sample_and_weighs_by_confidence() -> None:
    combined = combine([sampled("7 ", 0.9), sampled("8", 0.2), sampled("8", 0.3)])
    assert combined.output == "7 "
    assert combined.confidence == pytest.approx(0.9 / 1.4)
    assert combined.cost_usd == pytest.approx(0.003)
    assert combined.usage == Usage(prompt_tokens=12, completion_tokens=6, total_tokens=18)


def test_combine_counts_alike_when_a_sample_has_no_confidence() -> None:
    combined = combine([sampled("7", 0.9), sampled("8", None), sampled("8", 0.3)])
    assert (combined.output, combined.confidence) == pytest.approx(("8", 2 / 3))


async def test_the_runner_asks_for_n_samples_and_bills_them() -> None:
    def by_seed(_call: int, envelope: Envelope) -> Result:
        params = envelope.request.params
        assert params.temperature == 0.7 and not envelope.request.stream
        return sampled("odd" if (params.seed or 0) % 2 else "even", 0.5)

    backend = FakeBackend(by_seed)
    config = settings()
    config.route.ensemble_samples = 5
    runner = InferenceRunner(config, backend, seed=1)
    request = LLMRequest(
        id="r",
        tenant="acme",
        stream=True,
        messages=[ChatMessage(role=Role.USER, content="hi")],
        params=GenerationParams(seed=10),
    )
    env = Envelope(request=request, model="sim-small", route_reason=ENSEMBLE)
    await runner.run([env])
    assert backend.calls == [("sim-small", "r")] * 5
    assert env.status is Status.OK and env.result is not None
    assert (env.result.output, env.result.confidence) == pytest.approx(("even", 3 / 5))
    assert env.result.cost_usd == pytest.approx(0.005)
    assert env.request.params.seed == 10, "the request itself is not changed"

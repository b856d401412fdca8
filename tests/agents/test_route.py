"""Router with the default registry: chat by the rules (sim-small 4096 ctx, sim-large 32768
ctx), zoo tasks by the committed complexity classifier; cascades, budgets, replicas."""

from __future__ import annotations

from typing import Any

import pytest

from agents.ensemble import ENSEMBLE
from agents.postprocess import finish
from agents.route import CASCADE, ESCALATED, Router
from inference.complexity import ComplexityClassifier
from schemas.messages import (
    ChatMessage,
    Envelope,
    GenerationParams,
    LLMRequest,
    Result,
    Role,
    Status,
)
from topology.settings import ZOO, Settings

HARD_SUM = "add 48213+90577="
EASY_SUM = "add 12+7="


def envelope(
    prompt_tokens: int,
    max_tokens: int = 256,
    model: str | None = None,
    prompt: str = "x",
    tenant: str = "acme",
) -> Envelope:
    request = LLMRequest(
        id="r",
        tenant=tenant,
        model=model,
        messages=[ChatMessage(role=Role.USER, content=prompt)],
        params=GenerationParams(max_tokens=max_tokens),
    )
    return Envelope(request=request, prompt_tokens=prompt_tokens)


def task(prompt: str, tenant: str = "acme") -> Envelope:
    """A zoo task as preprocess leaves it: one token a character, a short answer."""
    return envelope(len(prompt), max_tokens=16, prompt=prompt, tenant=tenant)


@pytest.fixture(scope="module")
def classifier() -> ComplexityClassifier:
    return ComplexityClassifier(ZOO / "classifier", "cpu")


def with_route(classifier: ComplexityClassifier, **route: Any) -> Router:
    settings = Settings()
    settings = settings.model_copy(update={"route": settings.route.model_copy(update=route)})
    return Router(settings, classifier, seed=0)


@pytest.fixture
def router(classifier: ComplexityClassifier) -> Router:
    return with_route(classifier)


def test_hint_wins(router: Router) -> None:
    choice = router.choose(envelope(10, model="sim-large"))
    assert (choice.model, choice.reason) == ("sim-large", "hint")
    choice = router.choose(envelope(5000, model="sim-large"))
    assert choice.model == "sim-large"


def test_hint_that_cannot_hold_the_prompt_gets_no_model(router: Router) -> None:
    choice = router.choose(envelope(4000, max_tokens=200, model="sim-small"))
    assert choice.model is None
    assert "sim-small" in choice.reason


def test_short_prompt_goes_small(router: Router) -> None:
    choice = router.choose(envelope(512))
    assert (choice.model, choice.reason) == ("sim-small", "short_prompt")


def test_long_prompt_goes_large(router: Router) -> None:
    choice = router.choose(envelope(513))
    assert (choice.model, choice.reason) == ("sim-large", "long_prompt")


def test_prompt_plus_answer_beyond_small_context_goes_large() -> None:
    settings = Settings()
    small = settings.models[0].model_copy(update={"context_window": 1000})
    narrow = Router(settings.model_copy(update={"models": [small, *settings.models[1:]]}))
    assert narrow.choose(envelope(100, max_tokens=900)).model == "sim-small"
    choice = narrow.choose(envelope(100, max_tokens=901))
    assert (choice.model, choice.reason) == ("sim-large", "long_prompt")


def test_beyond_every_context_gets_no_model(router: Router) -> None:
    assert router.choose(envelope(30000, max_tokens=2768)).model == "sim-large"
    choice = router.choose(envelope(30000, max_tokens=2769))
    assert choice.model is None
    assert "context window" in choice.reason


def test_never_chooses_a_model_that_cannot_produce_max_tokens(router: Router) -> None:
    settings = Settings()
    choice = router.choose(envelope(10, max_tokens=3000))
    assert choice.model is not None
    spec = settings.model(choice.model)
    assert spec is not None
    assert spec.max_output_tokens >= 3000


def test_chat_goes_by_the_rules_with_the_classifier(router: Router) -> None:
    choice = router.choose(envelope(12, prompt="What is the capital of France?"))
    assert (choice.model, choice.reason) == ("sim-small", "short_prompt")


def test_easy_task_goes_to_the_small_zoo_model_and_hard_to_the_large(router: Router) -> None:
    assert router.choose(task(EASY_SUM)) == router.choose(task("reverse abc="))
    assert (router.choose(task(EASY_SUM)).model, router.choose(task(EASY_SUM)).reason) == (
        "zoo-small",
        "quality",
    )
    assert router.choose(task(HARD_SUM)).model == "zoo-large"


def test_the_threshold_trades_quality_for_cost(classifier: ComplexityClassifier) -> None:
    assert with_route(classifier, quality_threshold=0.0).choose(task(HARD_SUM)).model == (
        "zoo-small"
    )
    strict = with_route(classifier, quality_threshold=1.0).choose(task(HARD_SUM))
    assert (strict.model, strict.reason) == ("zoo-large", "best_predicted")


def test_a_task_too_long_for_the_zoo_goes_by_the_rules(router: Router) -> None:
    assert router.choose(envelope(16, max_tokens=64, prompt=HARD_SUM)).model == "sim-small"


def test_without_a_classifier_tasks_go_by_the_rules() -> None:
    assert Router(Settings()).choose(task(HARD_SUM)).model == "sim-small"


def test_cascade_starts_small_and_escalates_an_unsure_answer(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, policy="cascade", cascade_confidence=0.8)
    env = task(HARD_SUM)
    choice = router.assign(env)
    assert (choice.model, choice.reason) == ("zoo-small", CASCADE)
    env.model, env.route_reason = choice.model, choice.reason
    env.status, env.result = Status.OK, Result(output="139790", cost_usd=0.001, confidence=0.9)
    assert not router.escalate(env)
    env.result = Result(output="138790", cost_usd=0.001, confidence=0.4)
    assert router.escalate(env)
    # typed as the fields are: mypy still holds them to what was set before escalate()
    escalated: tuple[str, str, Result | None, Status | None] = ("zoo-large", ESCALATED, None, None)
    assert (env.model, env.route_reason, env.result, env.status) == escalated
    assert env.prior_cost_usd == 0.001
    env.status, env.result = Status.OK, Result(output="138790", cost_usd=0.005, confidence=0.1)
    assert not router.escalate(env), "an escalated answer stands"
    finish(env)
    assert env.result is not None and env.result.cost_usd == pytest.approx(0.006)


def test_cascade_never_escalates_an_error_or_the_top_model(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, policy="cascade")
    failed = task(HARD_SUM)
    failed.model, failed.route_reason, failed.status = "zoo-small", CASCADE, Status.ERROR
    failed.result = Result(confidence=0.0)
    assert router.escalation(failed) is None
    top = task(HARD_SUM)
    top.model, top.route_reason, top.status = "zoo-large", CASCADE, Status.OK
    top.result = Result(output="1", confidence=0.0)
    assert router.escalation(top) is None


def test_a_tenant_past_its_budget_gets_the_cheapest_model(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, tenant_budgets_usd={"thrifty": 0.01}, budget_window_s=60)
    assert router.choose(task(HARD_SUM, "thrifty"), now=0).model == "zoo-large"
    spent = task(HARD_SUM, "thrifty")
    spent.model, spent.status = "zoo-large", Status.OK
    spent.result, spent.stage_latency_ms = Result(cost_usd=0.01), {"infer": 5.0}
    router.observe(spent, now=1)
    choice = router.choose(task(HARD_SUM, "thrifty"), now=2)
    assert (choice.model, choice.reason) == ("zoo-small", "budget")
    assert router.choose(task(HARD_SUM, "acme"), now=2).model == "zoo-large"
    assert router.choose(task(HARD_SUM, "thrifty"), now=61).model == "zoo-large"


def replicated(count: int) -> Router:
    settings = Settings()
    small = settings.model("sim-small")
    assert small is not None
    copies = [
        small.model_copy(update={"name": f"sim-small-{i}", "replica_of": "sim-small"})
        for i in range(1, count)
    ]
    return Router(settings.model_copy(update={"models": [*settings.models, *copies]}), seed=0)


def answered(router: Router, deployment: str, latency_ms: float, ok: bool, now: float) -> None:
    env = envelope(10, model=deployment)
    env.model, env.status = deployment, Status.OK if ok else Status.ERROR
    env.stage_latency_ms = {"infer": latency_ms}
    router.observe(env, now)


def test_replicas_share_the_load_by_peak_ewma() -> None:
    router = replicated(2)
    picks = [router.assign(envelope(10)).model for _ in range(4)]
    assert set(picks) == {"sim-small", "sim-small-1"}, "in-flight calls spread the load"
    for deployment in picks:
        assert deployment is not None
        answered(router, deployment, 100.0, True, now=0.0)
    answered(router, "sim-small-1", 900.0, True, now=1.0)
    assert [router.assign(envelope(10)).model for _ in range(3)] == ["sim-small"] * 3


def test_unhealthy_replicas_are_skipped_until_all_are() -> None:
    router = replicated(3)
    for now in range(10):
        answered(router, "sim-small-1", 1.0, False, float(now))
    picks = {router.balancer.pick("sim-small") for _ in range(50)}
    assert picks == {"sim-small", "sim-small-2"}
    for now in range(10):
        answered(router, "sim-small", 1.0, False, float(now))
        answered(router, "sim-small-2", 1.0, False, float(now))
    assert len({router.balancer.pick("sim-small") for _ in range(50)}) == 3


def test_a_hint_is_balanced_across_its_replicas() -> None:
    router = replicated(2)
    picks = {router.assign(envelope(10, model="sim-small")).model for _ in range(4)}
    assert picks == {"sim-small", "sim-small-1"}


def test_an_ensemble_starts_small_and_escalates_a_split_vote(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, policy="ensemble", ensemble_agreement=0.7)
    env = task(HARD_SUM)
    choice = router.assign(env)
    assert (choice.model, choice.reason) == ("zoo-small", ENSEMBLE)
    env.model, env.route_reason = choice.model, choice.reason
    env.status, env.result = Status.OK, Result(output="139790", cost_usd=0.003, confidence=0.7)
    assert not router.escalate(env), "agreement at the bar stands"
    env.result = Result(output="138790", cost_usd=0.003, confidence=0.6)
    assert router.escalate(env)
    assert (env.model, env.route_reason, env.prior_cost_usd) == ("zoo-large", ESCALATED, 0.003)


def outcome(prompt: str, model: str, status: Status) -> Envelope:
    """A request as postprocess sees it after `model` answered it in infer."""
    env = task(prompt)
    env.model, env.route_reason, env.status = model, "quality", status
    env.result = Result(output="1", confidence=1.0)
    env.stage_latency_ms["infer"] = 5.0
    return env


def test_history_counts_only_once_it_has_enough_and_never_below_its_floor(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, history_min_observations=4, history_floor=0.3)
    for status in (Status.OK, Status.ERROR, Status.ERROR):
        router.escalate(outcome(EASY_SUM, "zoo-small", status))
    assert router.history.trust("task:add", "zoo-small") == 1.0
    router.escalate(outcome("add 1+1=", "zoo-small", Status.OK))
    assert router.history.trust("task:add", "zoo-small") == 0.5
    assert router.history.trust("task:sort", "zoo-small") == 1.0, "another task, another key"
    for _ in range(4):
        router.escalate(outcome(EASY_SUM, "zoo-small", Status.ERROR))
    assert router.history.trust("task:add", "zoo-small") == 0.3


def test_a_model_often_escalated_on_similar_requests_loses_the_route(
    classifier: ComplexityClassifier,
) -> None:
    router = with_route(classifier, history_min_observations=3, history_floor=0.4)
    assert router.choose(task(EASY_SUM)).model == "zoo-small"
    for _ in range(3):
        unsure = outcome(EASY_SUM, "zoo-small", Status.OK)
        unsure.route_reason, unsure.result = CASCADE, Result(output="1", confidence=0.1)
        assert router.escalate(unsure)
    assert router.history.trust("task:add", "zoo-small") == 0.4
    assert router.choose(task(EASY_SUM)).model == "zoo-large"
    bucketed = task(EASY_SUM)
    bucketed.semantic_bucket = 2
    assert router.choose(bucketed).model == "zoo-small", "a bucket is its own key"


def test_history_forgets_the_least_recent_key(classifier: ComplexityClassifier) -> None:
    router = with_route(classifier, history_min_observations=1, history_max_keys=1)
    router.history.record("a", "zoo-small", False)
    router.history.record("b", "zoo-small", False)
    assert router.history.trust("a", "zoo-small") == 1.0
    assert router.history.trust("b", "zoo-small") == 0.5

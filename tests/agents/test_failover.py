"""Request classes and their time budgets, fallback chains and the cheaper substitute."""

from __future__ import annotations

from collections.abc import Container

import pytest

from agents.failover import cheaper_substitute, fallback_chain, request_class, time_budget
from schemas.messages import Envelope, GenerationParams, LLMRequest, Priority, RequestClass
from topology.settings import ClassTimeout, InferSettings, ModelSpec, Settings


def request(**fields: object) -> LLMRequest:
    return LLMRequest.model_validate(
        {"id": "r", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, RequestClass.SIMPLE),
        ({"priority": "high"}, RequestClass.SIMPLE),
        ({"priority": "low"}, RequestClass.BATCH),
        ({"request_class": "complex"}, RequestClass.COMPLEX),
        ({"request_class": "simple", "priority": "low"}, RequestClass.SIMPLE),
    ],
)
def test_request_class_is_as_asked_else_from_priority(
    fields: dict[str, object], expected: RequestClass
) -> None:
    assert request_class(request(**fields)) is expected


def test_default_timeouts_per_class() -> None:
    infer = InferSettings()
    budgets = {c: time_budget(infer, request(request_class=c), now=0.0) for c in RequestClass}
    assert {c: b.total_s for c, b in budgets.items()} == {
        RequestClass.SIMPLE: 30.0,
        RequestClass.COMPLEX: 120.0,
        RequestClass.BATCH: 300.0,
    }
    assert budgets[RequestClass.SIMPLE].attempt_s == pytest.approx(10.0)


def test_the_deadline_cuts_the_budget_and_a_passed_one_leaves_none() -> None:
    infer = InferSettings()
    soon = time_budget(infer, request(deadline=105.0, priority=Priority.LOW), now=100.0)
    assert soon.total_s == pytest.approx(5.0)
    assert soon.attempt_s == pytest.approx(5.0 / 3)
    late = time_budget(infer, request(deadline=99.0), now=100.0)
    assert late.total_s == 0.0 and late.attempt_s == 0.0
    far = time_budget(infer, request(deadline=10_000.0), now=100.0)
    assert far.total_s == 30.0


def test_attempt_share_is_per_class() -> None:
    infer = InferSettings(
        timeouts={RequestClass.SIMPLE: ClassTimeout(total_s=8.0, attempt_share=0.25)}
    )
    assert time_budget(infer, request(), now=0.0).attempt_s == 2.0


def registry(fallbacks: dict[str, list[str]] | None = None) -> Settings:
    models = [
        ModelSpec(name="sim-small", input_per_1k=0.1, output_per_1k=0.2),
        ModelSpec(name="sim-large", input_per_1k=1.0, output_per_1k=2.0),
        ModelSpec(name="mid", input_per_1k=0.5, output_per_1k=1.0),
        ModelSpec(name="tiny-window", input_per_1k=0.01, output_per_1k=0.01, context_window=64),
        ModelSpec(name="tasks", input_per_1k=0.0, output_per_1k=0.0, capabilities=["tasks"]),
    ]
    return Settings(models=models, infer=InferSettings(fallbacks=fallbacks or {}))


def names(specs: list[ModelSpec]) -> list[str]:
    return [s.name for s in specs]


def test_the_chain_is_the_routed_model_then_its_fallbacks_once_each() -> None:
    settings = registry({"sim-large": ["mid", "sim-large", "mid", "sim-small"]})
    large = settings.model("sim-large")
    assert large is not None
    assert names(fallback_chain(settings, large)) == ["sim-large", "mid", "sim-small"]
    small = settings.model("sim-small")
    assert small is not None
    assert names(fallback_chain(settings, small)) == ["sim-small"]


def test_fallbacks_must_name_known_models() -> None:
    with pytest.raises(ValueError, match="unknown models"):
        Settings(infer=InferSettings(fallbacks={"sim-large": ["gpt-9"]}))


def envelope(max_tokens: int = 16, prompt_tokens: int = 10) -> Envelope:
    req = request(params=GenerationParams(max_tokens=max_tokens))
    return Envelope(request=req, model="sim-large", prompt_tokens=prompt_tokens)


def test_the_substitute_is_the_cheapest_untried_healthy_model_that_can_and_fits() -> None:
    settings = registry()
    large = settings.model("sim-large")
    assert large is not None

    def pick(env: Envelope, tried: list[str], down: Container[str] = frozenset()) -> str | None:
        spec = cheaper_substitute(settings, large, env, tried, lambda m: m not in down)
        return None if spec is None else spec.name

    # "tasks" is cheaper but cannot chat; "tiny-window" is cheapest while the request fits.
    assert pick(envelope(), ["sim-large"]) == "tiny-window"
    assert pick(envelope(max_tokens=100), ["sim-large"]) == "sim-small"
    assert pick(envelope(max_tokens=100), ["sim-large", "sim-small"]) == "mid"
    assert pick(envelope(max_tokens=100), ["sim-large"], down={"sim-small"}) == "mid"
    assert pick(envelope(max_tokens=100), ["sim-large", "sim-small", "mid"]) is None


def test_no_substitute_is_cheaper_than_the_cheapest() -> None:
    settings = registry()
    small = settings.model("sim-small")
    assert small is not None
    spec = cheaper_substitute(settings, small, envelope(max_tokens=100), ["sim-small"], bool)
    assert spec is None

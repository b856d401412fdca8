"""Router.choose with the default registry (sim-small 4096 ctx, sim-large 32768 ctx)."""

from __future__ import annotations

import pytest

from agents.route import Router
from schemas.messages import Envelope, LLMRequest
from topology.settings import Settings


def envelope(prompt_tokens: int, max_tokens: int = 256, model: str | None = None) -> Envelope:
    request = LLMRequest(
        id="r",
        tenant="acme",
        model=model,
        messages=[{"role": "user", "content": "x"}],
        params={"max_tokens": max_tokens},
    )
    return Envelope(request=request, prompt_tokens=prompt_tokens)


@pytest.fixture
def router() -> Router:
    return Router(Settings())


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

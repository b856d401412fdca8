"""What infer does when a model fails: how long a request may take, which model stands in
next, and which cheaper model may give a degraded answer once the chain is spent.

Plain functions of the settings and the request; `agents.infer` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from schemas.messages import Envelope, LLMRequest, Priority, RequestClass
from topology.settings import InferSettings, ModelSpec, Settings


def request_class(request: LLMRequest) -> RequestClass:
    """As the request says; unset, low priority work is batch work and the rest simple."""
    if request.request_class is not None:
        return request.request_class
    return RequestClass.BATCH if request.priority is Priority.LOW else RequestClass.SIMPLE


@dataclass(frozen=True)
class Budget:
    """Seconds infer may spend on a request in all (`total_s`) and on one call."""

    total_s: float
    attempt_s: float


def time_budget(settings: InferSettings, request: LLMRequest, now: float) -> Budget:
    """The class's timeout, cut short by the request's deadline; a call gets its share of
    that, so a hung one leaves time to try again."""
    timeout = settings.timeouts[request_class(request)]
    total = timeout.total_s
    if request.deadline is not None:
        total = min(total, request.deadline - now)
    total = max(total, 0.0)
    return Budget(total_s=total, attempt_s=total * timeout.attempt_share)


def fallback_chain(settings: Settings, model: ModelSpec) -> list[ModelSpec]:
    """The routed model, then the models configured to stand in for it, each once."""
    chain = [model]
    for name in settings.infer.fallbacks.get(model.name, []):
        spec = settings.model(name)
        if spec is not None and all(spec.name != c.name for c in chain):
            chain.append(spec)
    return chain


def cheaper_substitute(
    settings: Settings,
    routed: ModelSpec,
    envelope: Envelope,
    tried: Collection[str],
    available: Callable[[str], bool],
) -> ModelSpec | None:
    """The cheapest model not tried yet that costs less than the routed one for this
    request, can do what it does, fits it, and whose breaker lets calls through."""
    max_tokens = envelope.request.params.max_tokens

    def price(spec: ModelSpec) -> float:
        return spec.price(envelope.prompt_tokens, max_tokens)

    candidates = [
        spec
        for spec in settings.models
        if spec.name not in tried
        and price(spec) < price(routed)
        and set(routed.capabilities) <= set(spec.capabilities)
        and spec.fits(envelope.prompt_tokens, max_tokens)
        and available(spec.name)
    ]
    return min(candidates, key=price, default=None)

"""Ensemble: several sampled answers of one model combined by a weighted vote.

Infer asks the routed model for `route.ensemble_samples` answers of a request routed with
the `ensemble` policy (self-consistency); `combine` makes them one result whose confidence
is their weighted agreement, which postprocess's escalation reads like a cascade's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from schemas.messages import Envelope, Result, Usage

ENSEMBLE = "ensemble"


def vote(answers: Sequence[str], weights: Sequence[float] | None = None) -> tuple[str, float]:
    """The answer with the most weight (first seen wins a tie) and its share of the weight:
    with equal weights, self-consistency's majority and its agreement. Weights that sum to
    nothing say nothing, so the answers then count alike."""
    if weights is None or sum(weights) <= 0.0:
        weights = [1.0] * len(answers)
    totals: dict[str, float] = defaultdict(float)
    for answer, weight in zip(answers, weights, strict=True):
        totals[answer.strip()] += weight
    best = max(totals, key=lambda answer: totals[answer])
    return best, totals[best] / sum(totals.values())


def sample(envelope: Envelope, index: int, temperature: float) -> Envelope:
    """The request's `index`th sample: sampled at `temperature`, its own seed, no stream."""
    request = envelope.request
    seed = (request.params.seed or 0) + index
    params = request.params.model_copy(update={"temperature": temperature, "seed": seed})
    return envelope.model_copy(
        update={"request": request.model_copy(update={"params": params, "stream": False})}
    )


def combine(results: Sequence[Result]) -> Result:
    """The winning answer, billed for every sample. Each answer weighs its confidence (the
    decoder's least likely token) when every sample has one, else all weigh alike."""
    confidences = [r.confidence for r in results]
    weights = None if None in confidences else [c or 0.0 for c in confidences]
    answer, agreement = vote([r.output or "" for r in results], weights)
    winner = next(r for r in results if (r.output or "").strip() == answer)
    usage = Usage(
        prompt_tokens=sum(r.usage.prompt_tokens for r in results),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        total_tokens=sum(r.usage.total_tokens for r in results),
    )
    return winner.model_copy(
        update={
            "cost_usd": sum(r.cost_usd for r in results),
            "usage": usage,
            "confidence": agreement,
        }
    )

"""Route: pick the model for each request from the model registry.

This first version is rule-based: the caller's model hint wins; otherwise short prompts go
to the cheap model and long ones to the strong one, and a model whose context window cannot
hold the prompt plus the answer is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from faust.types import EventT

from schemas.messages import Envelope, ErrorCode
from streams import metrics
from streams.app import Pipeline
from topology.settings import Settings

STAGE = "route"


@dataclass(frozen=True)
class Choice:
    model: str | None
    reason: str


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fits(self, model: str, envelope: Envelope) -> bool:
        spec = self.settings.model(model)
        max_tokens = envelope.request.params.max_tokens
        return (
            spec is not None
            and max_tokens <= spec.max_output_tokens
            and envelope.prompt_tokens + max_tokens <= spec.context_window
        )

    def choose(self, envelope: Envelope) -> Choice:
        hint = envelope.request.model
        if hint is not None:
            if self.fits(hint, envelope):
                return Choice(hint, "hint")
            return Choice(None, f"prompt and answer exceed {hint}'s context window or output limit")
        rules = self.settings.route
        if envelope.prompt_tokens <= rules.small_max_prompt_tokens and self.fits(
            rules.small_model, envelope
        ):
            return Choice(rules.small_model, "short_prompt")
        if self.fits(rules.large_model, envelope):
            return Choice(rules.large_model, "long_prompt")
        return Choice(None, "prompt and answer exceed every model's context window or output limit")


def attach(pipeline: Pipeline) -> None:
    router = Router(pipeline.settings)

    async def route(_event: EventT[bytes], envelope: Envelope) -> None:
        choice = router.choose(envelope)
        if choice.model is None:
            metrics.stage_events.labels(STAGE, "no_model").inc()
            await pipeline.fail(envelope, ErrorCode.INVALID, "context_too_long", choice.reason)
            return
        metrics.stage_events.labels(STAGE, choice.model).inc()
        envelope.model, envelope.route_reason = choice.model, choice.reason
        await pipeline.send("batch", envelope)

    pipeline.stage_agent(STAGE, route)

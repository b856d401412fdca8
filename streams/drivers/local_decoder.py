"""Local decoder models in ONNX Runtime, behind the same backend interface as remote ones.

Each model folder (an Optimum-style export: model.onnx, config.json, tokenizer.json) gets
one session and one continuous batcher per worker; requests of any batch join the running
decode loop at its next step.
"""

from __future__ import annotations

import math
from pathlib import Path

from agents.infer import Delta, UpstreamError
from inference.decoder import ContinuousBatcher, DecoderModel, SamplingParams
from inference.runtime import ModelLoadError
from schemas.messages import Envelope, ErrorCode, Result, Usage
from topology.settings import EngineSettings, ModelSpec


def prompt_of(envelope: Envelope) -> str:
    """The last user turn: the zoo's models are trained on single-turn task prompts."""
    asked = envelope.request.last_user_turn()
    return envelope.request.messages[-1].content if asked is None else asked


def sampling_params(envelope: Envelope) -> SamplingParams:
    params = envelope.request.params
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop),
    )


class LocalDecoderBackend:
    """Loads every local model of the registry when the worker starts, so a missing or
    corrupt model file stops the worker with a clear error instead of failing requests."""

    def __init__(self, engine: EngineSettings, models: list[ModelSpec]) -> None:
        self.batchers: dict[str, ContinuousBatcher] = {}
        for spec in models:
            if spec.backend != "onnx":
                continue
            if spec.path is None:
                raise ModelLoadError(f"model {spec.name} has backend onnx but no path")
            model = DecoderModel(Path(spec.path), engine.device, engine.intra_op_threads)
            self.batchers[spec.name] = ContinuousBatcher(model, engine.max_batch)

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        batcher = self.batchers.get(spec.name)
        if batcher is None:
            raise UpstreamError("not_loaded", f"{spec.name} is not loaded", retryable=False)
        try:
            generation = await batcher.submit(
                prompt_of(envelope), sampling_params(envelope), on_delta
            )
        except ValueError as exc:
            raise UpstreamError(
                "not_for_this_model", f"{spec.name}: {exc}", False, code=ErrorCode.INVALID
            ) from exc
        completion = len(generation.token_ids)
        usage = Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=completion,
            total_tokens=generation.prompt_tokens + completion,
        )
        return Result(
            output=generation.text,
            finish_reason=generation.finish_reason,
            model=spec.name,
            usage=usage,
            cost_usd=spec.price(usage.prompt_tokens, usage.completion_tokens),
            confidence=math.exp(min(generation.logprobs)) if generation.logprobs else None,
        )

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()
        self.batchers.clear()

"""Learn: retrain the router's classifier from joined feedback and run its rollout.

The learn topic has one partition, so one worker at a time holds every joined example and
alone decides: while no candidate is out, every `train_after` new examples fine-tune the
incumbent (numpy, `inference.router_training`) into a candidate at the first share; while
one is out, its arm's feedback against the incumbent's moves it a step, adopts it, or
rolls it back (`agents.rollout.RolloutController`). Each decision is published on the
router-models topic, which every worker follows. A new owner of the partition starts the
current step's count afresh.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
from faust.types import StreamT
from pydantic import ValidationError

from agents.rollout import RolloutController, RouterVersions, router_model, versions_of
from inference.router_training import TrainingParams, train_version
from schemas.messages import LabelledExample, RouterModelsState, dump
from streams import metrics
from streams.app import Pipeline, raw_bytes
from topology.settings import FeedbackSettings

STAGE = "learn"
STATE_KEY = b"router-models"


class Learner:
    """The examples kept for training, and the decisions they lead to."""

    def __init__(self, settings: FeedbackSettings, versions: RouterVersions) -> None:
        self.settings = settings
        self.versions = versions
        self.examples: deque[LabelledExample] = deque(maxlen=settings.max_examples)
        self.fresh = 0
        self.controller = RolloutController(settings)

    def add(self, example: LabelledExample) -> RouterModelsState | None:
        """Learn from `example`; the new state to publish when a decision was made."""
        self.examples.append(example)
        self.fresh += 1
        if self.versions.candidate is None:
            return self.train() if self.fresh >= self.settings.train_after else None
        self._observe(example)
        return self._judge()

    def _observe(self, example: LabelledExample) -> None:
        candidate, routed = self.versions.candidate, example.routed
        if candidate is None:
            return
        if self.controller.version != candidate.version:
            steps = self.settings.steps
            step = next(i for i, share in enumerate(steps) if share >= self.versions.share)
            self.controller.start(candidate.version, step)
        if routed.candidate and routed.version == candidate.version:
            self.controller.observe(True, example.good)
        elif not routed.candidate and routed.version == self.versions.incumbent.version:
            self.controller.observe(False, example.good)
        for arm in ("candidate", "incumbent"):
            counts = getattr(self.controller, arm)
            metrics.router_model_good_share.labels(arm).set(counts.share)

    def _judge(self) -> RouterModelsState | None:
        candidate = self.versions.candidate
        decision = self.controller.decide()
        if candidate is None or decision == "hold":
            return None
        incumbent = router_model(self.versions.incumbent.onnx)
        if decision == "rollback":
            return RouterModelsState(incumbent=incumbent, event="rolled_back")
        if self.controller.promote():
            return RouterModelsState(incumbent=router_model(candidate.onnx), event="adopted")
        return RouterModelsState(
            incumbent=incumbent,
            candidate=router_model(candidate.onnx),
            candidate_share=self.controller.share,
            event="promoted",
        )

    def train(self) -> RouterModelsState | None:
        """A candidate fine-tuned from the incumbent on the kept examples of its models."""
        incumbent = self.versions.incumbent
        models = incumbent.classifier.models
        usable = [e for e in self.examples if e.routed.model in models]
        if not usable:
            return None
        self.fresh = 0
        onnx = train_version(
            incumbent.onnx,
            np.array([e.routed.features for e in usable], np.float32),
            np.array([models.index(e.routed.model) for e in usable]),
            np.array([float(e.good) for e in usable]),
            TrainingParams(self.settings.train_steps, self.settings.learning_rate),
        )
        trained = router_model(onnx)
        self.controller.start(trained.version)
        if self.controller.share >= 1.0:
            return RouterModelsState(incumbent=trained, event="adopted")
        return RouterModelsState(
            incumbent=router_model(incumbent.onnx),
            candidate=trained,
            candidate_share=self.controller.share,
            event="published",
        )


def attach(pipeline: Pipeline) -> None:
    versions = versions_of(pipeline)
    if versions is None:
        return
    learner = Learner(pipeline.settings.feedback, versions)
    states = pipeline.app.topic(
        pipeline.settings.topics.router_models.name, key_type=bytes, value_type=bytes
    )

    async def learn(stream: StreamT[bytes]) -> None:
        await versions.ready.wait()
        async for event in stream.events():
            try:
                example = LabelledExample.model_validate_json(raw_bytes(event))
            except ValidationError as exc:
                await pipeline.dead_letter(event, "bad_example", str(exc), None)
                continue
            # Training takes a while (numpy, a few thousand examples): off the event loop.
            state = await asyncio.to_thread(learner.add, example)
            if state is not None:
                versions.apply(state)
                metrics.router_model_rollouts.labels(state.event).inc()
                await states.send(key=STATE_KEY, value=dump(state))

    pipeline.app.agent(pipeline.stage_topics[STAGE], name=STAGE)(learn)

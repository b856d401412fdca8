"""Rolling out a retrained router model: the A/B split, the steps, the rollback, and how
every worker comes to use the same versions.

A request is in the candidate's share when a hash of its id falls below the share, so the
split is the same on every worker and a retried request stays in its arm. The state (the
incumbent, the candidate and its share) travels on the compacted router-models topic,
ONNX bytes included: each worker follows it from the start and swaps its classifiers in
place, without a restart, and a new worker starts from the latest state.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiokafka import TopicPartition
from pydantic import ValidationError

from inference.complexity import ComplexityClassifier
from inference.router_training import version_of
from inference.runtime import ModelLoadError
from schemas.messages import RouterModel, RouterModelsState
from streams import metrics
from streams.app import Pipeline
from streams.watch import watcher
from topology.settings import FeedbackSettings, Settings

log = logging.getLogger(__name__)
Decision = Literal["hold", "promote", "rollback"]


def in_candidate_share(request_id: str, share: float) -> bool:
    """Whether `request_id` is routed by the candidate when it takes `share` of requests."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def router_model(onnx_bytes: bytes) -> RouterModel:
    return RouterModel(
        version=version_of(onnx_bytes), onnx_b64=base64.b64encode(onnx_bytes).decode()
    )


def onnx_of(model: RouterModel) -> bytes:
    return base64.b64decode(model.onnx_b64)


class Arm:
    """Good and bad feedback on the answers of requests one arm routed."""

    def __init__(self) -> None:
        self.good = 0
        self.total = 0

    def add(self, good: bool) -> None:
        self.good += good
        self.total += 1

    @property
    def share(self) -> float:
        return self.good / self.total if self.total else 0.0


class RolloutController:
    """Decides, from feedback, whether a candidate moves to its next share, stays, or is
    rolled back. Each step counts afresh, so a step is judged on its own traffic."""

    def __init__(self, settings: FeedbackSettings) -> None:
        self.settings = settings
        self.version: str | None = None
        self.step = 0
        self.candidate, self.incumbent = Arm(), Arm()

    @property
    def share(self) -> float:
        return self.settings.steps[self.step]

    def start(self, version: str, step: int = 0) -> None:
        self.version, self.step = version, step
        self.candidate, self.incumbent = Arm(), Arm()

    def observe(self, candidate: bool, good: bool) -> None:
        (self.candidate if candidate else self.incumbent).add(good)

    def worse_z(self) -> float:
        """One-sided two-proportion z that the candidate's good share is below the
        incumbent's by more than the margin (pooled standard error)."""
        c, i = self.candidate, self.incumbent
        pooled = (c.good + i.good) / (c.total + i.total)
        error = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / c.total + 1 / i.total))
        return (i.share - c.share - self.settings.margin) / error

    def decide(self) -> Decision:
        c, i = self.candidate, self.incumbent
        if c.total < self.settings.min_samples or i.total < self.settings.min_samples:
            return "hold"
        if self.worse_z() > self.settings.z_critical:
            return "rollback"
        if (
            c.total >= self.settings.min_events_per_step
            and c.share >= i.share - self.settings.margin
        ):
            return "promote"
        return "hold"

    def promote(self) -> bool:
        """Move to the next share; True when that makes the candidate the incumbent."""
        self.start(self.version or "", self.step + 1)
        return self.share >= 1.0


@dataclass(frozen=True)
class Loaded:
    """One router model ready to route with."""

    version: str
    onnx: bytes
    classifier: ComplexityClassifier


Use = Callable[[Loaded, Loaded | None, float], None]


class RouterVersions:
    """The router models this worker routes with, kept in step with the router-models topic.

    A version is written to `folder/<version>/` with the base classifier's card just long
    enough for ONNX Runtime to load it from there, and kept loaded (in memory) while in use;
    listeners hear of each change.
    """

    def __init__(self, base_folder: Path, folder: Path) -> None:
        self.base_folder = base_folder
        self.folder = folder
        self.listeners: list[Use] = []
        onnx = (base_folder / "model.onnx").read_bytes()
        self.incumbent = Loaded(version_of(onnx), onnx, ComplexityClassifier(base_folder, "cpu"))
        self.candidate: Loaded | None = None
        self.share = 0.0
        self.ready = asyncio.Event()  # set once the topic's states up to now are applied

    def listen(self, use: Use) -> None:
        """Have `use` route with the models in use now and with every later change."""
        self.listeners.append(use)
        use(self.incumbent, self.candidate, self.share)

    @property
    def state(self) -> RouterModelsState:
        candidate = None if self.candidate is None else router_model(self.candidate.onnx)
        return RouterModelsState(
            incumbent=router_model(self.incumbent.onnx),
            candidate=candidate,
            candidate_share=self.share if candidate else 0.0,
            event="current",
        )

    def load(self, model: RouterModel) -> Loaded:
        for known in (self.incumbent, self.candidate):
            if known is not None and known.version == model.version:
                return known
        onnx = onnx_of(model)
        folder = self.folder / model.version
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.base_folder / "classifier.json", folder / "classifier.json")
        (folder / "model.onnx").write_bytes(onnx)
        try:
            classifier = ComplexityClassifier(folder, "cpu")
        finally:
            shutil.rmtree(folder)
        if classifier.models != self.incumbent.classifier.models:
            raise ValueError(f"router model {model.version} is for {classifier.models}")
        metrics.router_model_reloads.inc()
        return Loaded(model.version, onnx, classifier)

    def apply(self, state: RouterModelsState) -> None:
        """Route with `state`'s models from now on."""
        self.incumbent = self.load(state.incumbent)
        self.candidate = None if state.candidate is None else self.load(state.candidate)
        self.share = state.candidate_share if self.candidate else 0.0
        metrics.router_model_candidate_share.set(self.share)
        for use in self.listeners:
            use(self.incumbent, self.candidate, self.share)


async def watch_router_models(settings: Settings, versions: RouterVersions) -> None:
    """Apply every state on the router-models topic, from its start, until cancelled."""
    topic = TopicPartition(settings.topics.router_models.name, 0)
    async with watcher(settings, [topic]) as consumer:
        await consumer.seek_to_beginning(topic)
        end = (await consumer.end_offsets([topic]))[topic]
        if end == 0:
            versions.ready.set()
        async for message in consumer:
            try:
                versions.apply(RouterModelsState.model_validate_json(message.value or b""))
            except (ValidationError, ValueError, ModelLoadError) as exc:
                log.warning("router-models offset %s not applied: %s", message.offset, exc)
            if message.offset >= end - 1:
                versions.ready.set()


def versions_of(pipeline: Pipeline) -> RouterVersions | None:
    """The worker's one RouterVersions, following the router-models topic; None when
    routing has no classifier (rules only), so there is nothing to learn."""
    settings = pipeline.settings
    if settings.route.classifier is None:
        return None

    def follow() -> RouterVersions:
        folder = Path(settings.data_dir) / "router-models"
        versions = RouterVersions(Path(settings.route.classifier or ""), folder)

        async def watch() -> None:
            await watch_router_models(settings, versions)

        pipeline.app.task(watch)
        return versions

    return pipeline.shared("router-versions", follow)

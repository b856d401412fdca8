"""Route: pick the model for each request from the model registry, then one of its replicas.

A caller's model hint wins. Otherwise the complexity classifier predicts, for each model it
knows (the zoo), the chance that it answers the prompt right: a prompt none of them is likely
to answer is chat and goes by the rules (short to the cheap model, long to the strong one);
a task goes to the cheapest model predicted to meet the quality threshold (`quality`), or to
the cheapest first with postprocess escalating unsure answers (`cascade`), or to the
cheapest sampled several times with postprocess escalating a split vote (`ensemble`). The
predictions are scaled by how often each model's answers to similar requests stood. A
model whose context window cannot hold the prompt plus the answer is never chosen, and a
tenant past its budget gets the cheapest model that fits. Replicas of the chosen model are
balanced by power of two choices on peak-EWMA latency, skipping unhealthy ones.

The live statistics, history and spend are this worker's: route and postprocess share the
locality key, so the requests a worker routes are the ones whose answers it sees.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, replace
from pathlib import Path

from faust.types import EventT

from agents.ensemble import ENSEMBLE
from agents.rollout import Loaded, in_candidate_share, versions_of
from inference.complexity import ComplexityClassifier, prompt_features, task_type
from schemas.messages import Envelope, ErrorCode, RoutedRecord, Status, dump
from streams import metrics
from streams.app import Pipeline
from topology.settings import ModelSpec, RouteSettings, Settings

STAGE = "route"
CASCADE = "cascade"
ESCALATED = "cascade_escalated"
ESCALATING = (CASCADE, ENSEMBLE)


@dataclass(frozen=True)
class Choice:
    model: str | None
    reason: str
    version: str | None = None  # the router-model version, when its classifier decided
    candidate: bool = False  # whether that was the candidate of a rollout


class DeploymentStats:
    """One deployment's live numbers: peak-EWMA latency (Finagle's: a slow answer counts at
    once, fast ones pull it down over `latency_decay_s`), error-rate EWMA, calls in flight.
    A deployment not heard from yet has latency 0, so it is tried soon."""

    def __init__(self) -> None:
        self.latency_s = 0.0
        self.error_rate = 0.0
        self.in_flight = 0
        self.updated_at: float | None = None

    def finish(self, latency_s: float, ok: bool, now: float, settings: RouteSettings) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self.updated_at is None or latency_s >= self.latency_s:
            self.latency_s = latency_s
        else:
            kept = math.exp(-(now - self.updated_at) / settings.latency_decay_s)
            self.latency_s = kept * self.latency_s + (1 - kept) * latency_s
        self.error_rate = settings.error_decay * self.error_rate + (1 - settings.error_decay) * (
            0.0 if ok else 1.0
        )
        self.updated_at = now

    def load(self) -> float:
        """Expected wait for one more call: latency times the calls it would queue behind."""
        return self.latency_s * (self.in_flight + 1)


class Balancer:
    """Power of two choices over a model's replicas (ModelSpec.replica_of) on peak-EWMA load;
    replicas whose error rate is past `unhealthy_error_rate` are used only when all are."""

    def __init__(self, settings: Settings, rng: random.Random) -> None:
        self.settings = settings.route
        self.rng = rng
        self.replicas: dict[str, list[str]] = defaultdict(list)
        for spec in settings.models:
            self.replicas[spec.replica_of or spec.name].append(spec.name)
        self.stats: dict[str, DeploymentStats] = defaultdict(DeploymentStats)

    def pick(self, model: str) -> str:
        replicas = self.replicas.get(model, [model])
        limit = self.settings.unhealthy_error_rate
        healthy = [r for r in replicas if self.stats[r].error_rate <= limit] or replicas
        if len(healthy) == 1:
            return healthy[0]
        return min(self.rng.sample(healthy, 2), key=lambda r: self.stats[r].load())

    def start(self, deployment: str) -> None:
        self.stats[deployment].in_flight += 1

    def finish(self, deployment: str, latency_s: float, ok: bool, now: float) -> None:
        self.stats[deployment].finish(latency_s, ok, now, self.settings)


class TenantBudgets:
    """What each tenant with a budget spent in the current fixed window."""

    def __init__(self, settings: RouteSettings) -> None:
        self.settings = settings
        self.spent: dict[str, tuple[int, float]] = {}  # tenant: (window index, usd)

    def _window(self, now: float) -> int:
        return int(now // self.settings.budget_window_s)

    def charge(self, tenant: str, usd: float, now: float) -> None:
        if tenant not in self.settings.tenant_budgets_usd:
            return
        window, spent = self.spent.get(tenant, (self._window(now), 0.0))
        if window != self._window(now):
            window, spent = self._window(now), 0.0
        self.spent[tenant] = (window, spent + usd)

    def exhausted(self, tenant: str, now: float) -> bool:
        budget = self.settings.tenant_budgets_usd.get(tenant)
        window, spent = self.spent.get(tenant, (self._window(now), 0.0))
        return budget is not None and window == self._window(now) and spent >= budget


class History:
    """Whether each model's recent answers to similar requests stood (neither escalated nor
    failed), kept per key that similar requests share: the LSH bucket of the prompt's
    embedding when preprocess set one, else the prompt's task type."""

    def __init__(self, settings: RouteSettings) -> None:
        self.settings = settings
        self.outcomes: OrderedDict[str, dict[str, deque[bool]]] = OrderedDict()

    @staticmethod
    def key(envelope: Envelope) -> str:
        if envelope.semantic_bucket is not None:
            return f"bucket:{envelope.semantic_bucket}"
        return f"task:{task_type(envelope.request.last_user_turn() or '')}"

    def record(self, key: str, model: str, stood: bool) -> None:
        models = self.outcomes.setdefault(key, {})
        self.outcomes.move_to_end(key)
        if len(self.outcomes) > self.settings.history_max_keys:
            self.outcomes.popitem(last=False)
        models.setdefault(model, deque(maxlen=self.settings.history_window)).append(stood)

    def trust(self, key: str, model: str) -> float:
        """What to scale the model's predicted chance by: the share of its answers that
        stood, bounded below by `history_floor`; 1 until there are enough of them."""
        seen = self.outcomes.get(key, {}).get(model)
        if seen is None or len(seen) < self.settings.history_min_observations:
            return 1.0
        return max(self.settings.history_floor, sum(seen) / len(seen))


def price_per_1k(spec: ModelSpec) -> float:
    return spec.input_per_1k + spec.output_per_1k


class Router:
    """The route stage's decisions, and what postprocess tells it about their outcomes."""

    def __init__(
        self,
        settings: Settings,
        classifier: ComplexityClassifier | None = None,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.classifier = classifier
        self.version: str | None = None
        self.candidate: Loaded | None = None
        self.candidate_share = 0.0
        self.balancer = Balancer(settings, random.Random(seed))
        self.budgets = TenantBudgets(settings.route)
        self.history = History(settings.route)

    @classmethod
    def from_settings(cls, settings: Settings, seed: int | None = None) -> Router:
        """With the configured classifier, on the CPU: a 20-feature MLP is quicker there than
        a trip to a GPU."""
        path = settings.route.classifier
        classifier = None if path is None else ComplexityClassifier(Path(path), "cpu")
        return cls(settings, classifier, seed)

    def use(self, incumbent: Loaded, candidate: Loaded | None, share: float) -> None:
        """Route with these router models from the next request on (a hot reload)."""
        self.classifier, self.version = incumbent.classifier, incumbent.version
        self.candidate, self.candidate_share = candidate, share

    def deciding(self, request_id: str) -> tuple[ComplexityClassifier | None, str | None, bool]:
        """The classifier that decides for this request, its version, and whether it is the
        candidate's (for the requests in its share)."""
        candidate = self.candidate
        if candidate is not None and in_candidate_share(request_id, self.candidate_share):
            return candidate.classifier, candidate.version, True
        return self.classifier, self.version, False

    def fits(self, model: str, envelope: Envelope) -> bool:
        spec = self.settings.model(model)
        max_tokens = envelope.request.params.max_tokens
        return (
            spec is not None
            and max_tokens <= spec.max_output_tokens
            and envelope.prompt_tokens + max_tokens <= spec.context_window
        )

    def predict(self, envelope: Envelope) -> dict[str, float]:
        """Each classifier model that fits the request, cheapest first, with its predicted
        chance of answering right as the history of similar requests trusts it; empty
        without a classifier or a user turn."""
        prompt = envelope.request.last_user_turn()
        classifier, _, _ = self.deciding(envelope.request.id)
        if classifier is None or self.settings.route.policy == "rules" or prompt is None:
            return {}
        specs = [self.settings.model(name) for name in classifier.models]
        fitting = sorted(
            (s for s in specs if s is not None and self.fits(s.name, envelope)), key=price_per_1k
        )
        if not fitting:
            return {}
        p_correct = classifier.predict([prompt])
        key = self.history.key(envelope)
        return {
            s.name: float(p_correct[s.name][0]) * self.history.trust(key, s.name) for s in fitting
        }

    def choose(self, envelope: Envelope, now: float | None = None) -> Choice:
        """The model (not yet the replica) for this request, and why."""
        hint = envelope.request.model
        if hint is not None:
            if self.fits(hint, envelope):
                return Choice(hint, "hint")
            return Choice(None, f"prompt and answer exceed {hint}'s context window or output limit")
        now = time.time() if now is None else now
        thrifty = self.budgets.exhausted(envelope.request.tenant, now)
        predicted = self.predict(envelope)
        if predicted and max(predicted.values()) >= self.settings.route.task_floor:
            _, version, candidate = self.deciding(envelope.request.id)
            return replace(self._among(predicted, thrifty), version=version, candidate=candidate)
        rules = self.settings.route
        short = envelope.prompt_tokens <= rules.small_max_prompt_tokens
        if (short or thrifty) and self.fits(rules.small_model, envelope):
            return Choice(rules.small_model, "budget" if thrifty and not short else "short_prompt")
        if self.fits(rules.large_model, envelope):
            return Choice(rules.large_model, "long_prompt")
        return Choice(None, "prompt and answer exceed every model's context window or output limit")

    def _among(self, predicted: dict[str, float], thrifty: bool) -> Choice:
        cheapest = next(iter(predicted))
        if thrifty:
            return Choice(cheapest, "budget")
        policy = self.settings.route.policy
        if policy in ESCALATING:
            return Choice(cheapest, policy)
        threshold = self.settings.route.quality_threshold
        meeting = [name for name, p in predicted.items() if p >= threshold]
        if meeting:
            return Choice(meeting[0], "quality")
        return Choice(max(predicted, key=lambda name: predicted[name]), "best_predicted")

    def routed(self, envelope: Envelope, choice: Choice) -> RoutedRecord | None:
        """What feedback on this request's answer will be joined with: only where the
        classifier chose the one model that answers (a cascade or an ensemble may end on
        another, so feedback could not say which model it is about)."""
        prompt = envelope.request.last_user_turn()
        if choice.version is None or choice.model is None or choice.reason in ESCALATING:
            return None
        return RoutedRecord(
            request_id=envelope.request.id,
            tenant=envelope.request.tenant,
            model=self.logical(choice.model),
            version=choice.version,
            candidate=choice.candidate,
            features=prompt_features(prompt or "").tolist(),
        )

    def stronger(self, envelope: Envelope) -> str | None:
        """The next model up from the one that answered, among the classifier's models that
        fit the request: where a cascade or an ensemble that disagrees escalates to."""
        answered = self.settings.model(envelope.model or "")
        if answered is None or self.classifier is None:
            return None
        ladder = [
            spec
            for spec in (self.settings.model(name) for name in self.classifier.models)
            if spec is not None and self.fits(spec.name, envelope)
        ]
        pricier = [s for s in ladder if price_per_1k(s) > price_per_1k(answered)]
        return min(pricier, key=price_per_1k).name if pricier else None

    def escalation(self, envelope: Envelope) -> str | None:
        """Where a cascade's or an ensemble's answer goes next: up a model when it is ok but
        unsure (its least likely token, or its vote's agreement, below the policy's bar)."""
        route = self.settings.route
        bar = {CASCADE: route.cascade_confidence, ENSEMBLE: route.ensemble_agreement}.get(
            envelope.route_reason or ""
        )
        result = envelope.result
        if (
            bar is None
            or envelope.status is not Status.OK
            or result is None
            or result.confidence is None
            or result.confidence >= bar
        ):
            return None
        return self.stronger(envelope)

    def escalate(self, envelope: Envelope) -> bool:
        """Set an unsure answer aside, its cost kept, and send the request to a replica of
        the next model up; False when the answer stands. Either way the history learns
        whether the model's answer stood."""
        target = self.escalation(envelope)
        self._remember(envelope, stood=target is None and envelope.status is Status.OK)
        if target is None:
            return False
        envelope.prior_cost_usd += envelope.result.cost_usd if envelope.result else 0.0
        envelope.result, envelope.status = None, None
        envelope.model, envelope.route_reason = self._start(target), ESCALATED
        return True

    def _remember(self, envelope: Envelope, stood: bool) -> None:
        """Only answers a model gave count; a cancelled request says nothing of the model."""
        error = envelope.result.error if envelope.result else None
        cancelled = error is not None and error.code is ErrorCode.CANCELLED
        if envelope.model is None or "infer" not in envelope.stage_latency_ms or cancelled:
            return
        self.history.record(self.history.key(envelope), self.logical(envelope.model), stood)
        metrics.count_routing_outcome(
            self.logical(envelope.model), stood, envelope.status is Status.OK
        )

    def _start(self, model: str) -> str:
        deployment = self.balancer.pick(self.logical(model))
        self.balancer.start(deployment)
        return deployment

    def assign(self, envelope: Envelope, now: float | None = None) -> Choice:
        """Choose the model, then its replica, and count the call as in flight there."""
        choice = self.choose(envelope, now)
        if choice.model is None:
            return choice
        return replace(choice, model=self._start(choice.model))

    def logical(self, deployment: str) -> str:
        spec = self.settings.model(deployment)
        return deployment if spec is None or spec.replica_of is None else spec.replica_of

    def observe(self, envelope: Envelope, now: float | None = None) -> None:
        """Learn from an answer that went through infer: its deployment's latency and health,
        and its tenant's spend."""
        latency_ms = envelope.stage_latency_ms.get("infer")
        if envelope.model is None or latency_ms is None:
            return
        now = time.time() if now is None else now
        ok = envelope.status is Status.OK
        self.balancer.finish(envelope.model, latency_ms / 1e3, ok, now)
        cost = envelope.result.cost_usd if envelope.result else 0.0
        self.budgets.charge(envelope.request.tenant, cost, now)


def router_of(pipeline: Pipeline) -> Router:
    """The worker's one Router, shared by route (decisions) and postprocess (outcomes)."""
    return pipeline.shared("router", lambda: Router.from_settings(pipeline.settings))


def attach(pipeline: Pipeline) -> None:
    router = router_of(pipeline)
    versions = versions_of(pipeline)
    if versions is not None:
        versions.listen(router.use)
    learning = pipeline.settings.feedback.enabled

    async def route(_event: EventT[bytes], envelope: Envelope) -> None:
        choice = router.assign(envelope)
        if choice.model is None:
            metrics.stage_events.labels(STAGE, "no_model").inc()
            await pipeline.fail(envelope, ErrorCode.INVALID, "context_too_long", choice.reason)
            return
        metrics.stage_events.labels(STAGE, choice.model).inc()
        envelope.model, envelope.route_reason = choice.model, choice.reason
        await pipeline.send("batch", envelope)
        record = router.routed(envelope, choice) if learning else None
        if record is not None:
            key = record.request_id.encode()
            await pipeline.stage_topics["feedback"].send(key=key, value=dump(record))

    pipeline.stage_agent(STAGE, route)

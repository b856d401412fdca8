"""The one settings object: topics, the stage graph, the model registry, limits.

Values come from the defaults below, then a JSON file named by `LLMFLOW_CONFIG`, then
environment variables `LLMFLOW_<FIELD>` (nested fields joined by `__`, values parsed as
JSON when they parse, else taken as strings). Agents read everything from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.messages import RequestClass

ENV_PREFIX = "LLMFLOW_"
ZOO = Path(__file__).resolve().parent.parent / "models" / "artifacts"
ZOO_MODELS = ("zoo-small", "zoo-large")
EMBEDDING_CENTER = ZOO / "minilm-center.json"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopicSpec(Section):
    name: str
    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000
    compacted: bool = False

    def kafka_config(self) -> dict[str, str]:
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": "compact" if self.compacted else "delete",
        }


class Topics(Section):
    """Wire topics; the stage topics are in `StageSpec`. The requests and responses topics
    are also the replay record (`llmflow replay`, `llmflow evaluate`): their `retention_ms`
    (`LLMFLOW_TOPICS__REQUESTS__RETENTION_MS`) is how far back a replay can reach."""

    requests: TopicSpec = TopicSpec(name="llm.requests")
    responses: TopicSpec = TopicSpec(name="llm.responses")
    stream: TopicSpec = TopicSpec(name="llm.responses.stream")
    dlq: TopicSpec = TopicSpec(name="llm.dlq", retention_ms=30 * 24 * 3600 * 1000)
    feedback: TopicSpec = TopicSpec(name="llm.feedback")
    cancel: TopicSpec = TopicSpec(name="llm.cancel", retention_ms=24 * 3600 * 1000)
    # One key holds the router models in use; compaction keeps the latest for new workers.
    router_models: TopicSpec = TopicSpec(name="llm.router-models", partitions=1, compacted=True)


KeyBy = Literal["tenant", "fingerprint", "locality", "model", "request_id"]
# Stages keyed by these share Tables, so their topics need one partition count.
COPARTITIONED: tuple[KeyBy, ...] = ("fingerprint", "locality")
# Which sends may run the next stage in process instead of producing to its topic.
Fusion = Literal["off", "key", "local"]
# Preprocess reads the public requests topic, so it has no StageSpec of its own.
ENTRY_STAGE = "preprocess"
# How docker-compose.yml and k8s split the stages into worker groups: core holds every
# stage that shares the in-flight and cache Tables; infer runs fused inside batch; respond
# holds the stages keyed by request id off the model path (feedback joins, the learner).
DEPLOY_GROUPS: dict[str, tuple[str, ...]] = {
    "edge": ("preprocess", "ratelimit"),
    "core": ("dedup", "cache", "route", "postprocess", "warm"),
    "infer": ("batch",),
    "respond": ("respond", "status", "feedback", "learn"),
}


class StageSpec(Section):
    """One stage: the topic it consumes and the key that topic is partitioned by.

    Stages that share a key are co-partitioned, so a Table one writes is local to the other.
    """

    name: str
    topic: TopicSpec
    key_by: KeyBy


def _stage(name: str, key_by: KeyBy) -> StageSpec:
    return StageSpec(name=name, topic=TopicSpec(name=f"llm.stage.{name}"), key_by=key_by)


def default_stages() -> list[StageSpec]:
    """The path of one request. Preprocess reads the public requests topic directly.

    `locality` is the LSH bucket of the embedding when the request has one (near-duplicates
    meet on one partition), else the fingerprint (identical requests do). `warm` is not on
    the path: `llmflow warm` fills the cache through it from earlier traffic. Nor is
    `status`: requests report there the points they reach (`agents.status`).
    """
    return [
        _stage("ratelimit", "tenant"),
        _stage("dedup", "locality"),
        _stage("cache", "locality"),
        _stage("route", "locality"),
        _stage("batch", "model"),
        _stage("postprocess", "locality"),
        _stage("respond", "request_id"),
        _stage("warm", "locality"),
        StageSpec(name="status", topic=TopicSpec(name="llm.status"), key_by="request_id"),
        _stage("feedback", "request_id"),
        # One partition: one worker learns from all feedback and runs the rollout.
        StageSpec(
            name="learn", topic=TopicSpec(name="llm.stage.learn", partitions=1), key_by="request_id"
        ),
    ]


def default_tables() -> dict[str, str]:
    """faust Tables by name, each with the stage whose topic it is co-partitioned with."""
    return {
        "ratelimit-buckets": "ratelimit",
        "dedup-inflight": "dedup",
        "cache-exact": "cache",
        "cache-semantic": "cache",
        "request-status": "status",
    }


class ModelSpec(Section):
    """One deployment in the model registry."""

    name: str
    backend: Literal["openai", "onnx"] = "openai"
    path: str | None = Field(
        default=None, description="onnx backend: folder with model.onnx and tokenizer.json"
    )
    upstream_model: str | None = None
    replica_of: str | None = Field(
        default=None, description="another deployment of this model: the router balances them"
    )
    base_url: str | None = Field(default=None, description="overrides Settings.provider_url")
    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    quality: float = Field(default=0.5, ge=0.0, le=1.0)
    context_window: int = 4096
    max_output_tokens: int = 4096
    capabilities: list[str] = Field(default_factory=lambda: ["chat"])
    flops_per_token: int | None = Field(default=None, description="local models: the price basis")
    accuracy: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="measured share right, by task and difficulty"
    )
    max_batches_in_flight: int = Field(default=256, ge=1)
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="None: 1 for an HTTP model (one request per call), else BatchSettings.max_size",
    )

    def batch_limit(self, default: int) -> int:
        """An HTTP call carries one request, so grouping remote requests only adds a wait."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return 1 if self.backend == "openai" else default

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """US dollars for one call at the registry's prices."""
        return (prompt_tokens * self.input_per_1k + completion_tokens * self.output_per_1k) / 1e3

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether the prompt and the longest answer asked for fit this model."""
        return (
            max_tokens <= self.max_output_tokens
            and prompt_tokens + max_tokens <= self.context_window
        )


def zoo_model(folder: Path) -> ModelSpec:
    """A local model of the repo's zoo, priced and scored from the card its build wrote."""
    if not (folder / "card.json").is_file():
        raise ValueError(
            f"{folder / 'card.json'} is missing: the zoo is committed under models/artifacts "
            "and checked by `make models`"
        )
    card = json.loads((folder / "card.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    accuracy = card["accuracy"]
    scores = [share for by_difficulty in accuracy.values() for share in by_difficulty.values()]
    window = int(config["max_position_embeddings"])
    return ModelSpec(
        name=card["name"],
        backend="onnx",
        path=str(folder),
        input_per_1k=card["price_per_1k_tokens_usd"],
        output_per_1k=card["price_per_1k_tokens_usd"],
        quality=round(sum(scores) / len(scores), 4),
        context_window=window,
        max_output_tokens=window,
        capabilities=["tasks"],
        flops_per_token=card["flops_per_token"],
        accuracy=accuracy,
    )


def default_models() -> list[ModelSpec]:
    """Two simulated remote models and the repo's zoo of local ONNX decoders."""
    zoo = [zoo_model(ZOO / name) for name in ZOO_MODELS]
    return [
        ModelSpec(
            name="sim-small",
            input_per_1k=0.0001,
            output_per_1k=0.0002,
            quality=0.6,
            context_window=4096,
            max_output_tokens=2048,
        ),
        ModelSpec(
            name="sim-large",
            input_per_1k=0.001,
            output_per_1k=0.002,
            quality=0.9,
            context_window=32768,
            max_output_tokens=8192,
        ),
        *zoo,
    ]


class RateLimit(Section):
    """A token bucket: `burst` at most, refilled at `per_second` (requests, or LLM tokens)."""

    burst: float = Field(default=200.0, gt=0)
    per_second: float = Field(default=100.0, gt=0)

    @property
    def refill_s(self) -> float:
        """Time an empty bucket takes to fill."""
        return self.burst / self.per_second


class Rates(Section):
    """The buckets of one scope, each optional: requests, and tokens (a request costs its
    prompt_tokens + max_tokens, charged at admission)."""

    requests: RateLimit | None = None
    tokens: RateLimit | None = None


class Quota(Section):
    """One tenant's limits: for the whole tenant, for each of its users, and for each api
    type it calls. All live under the tenant's key, so one check covers them all."""

    tenant: Rates = Rates(requests=RateLimit())
    user: Rates = Rates()
    api_types: dict[str, Rates] = Field(default_factory=dict)
    reserve: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="share of every bucket only high priority may use (Stripe keeps 20 %)",
    )

    @model_validator(mode="before")
    @classmethod
    def _requests_shorthand(cls, value: Any) -> Any:
        """`{"burst": 50, "per_second": 10}` is the tenant's request limit alone."""
        if isinstance(value, dict) and "burst" in value:
            return {"tenant": {"requests": value}}
        return value

    def longest_refill_s(self) -> float:
        rates = [self.tenant, self.user, *self.api_types.values()]
        limits = [limit for r in rates for limit in (r.requests, r.tokens) if limit is not None]
        return max((limit.refill_s for limit in limits), default=0.0)


class AdaptiveLimit(Section):
    """AIMD on the rate buckets refill at: every `interval_s`, a worker whose watched stages
    queued requests longer than `target_s` on average multiplies the rate by `decrease`,
    else adds `increase`, within [`min_scale`, 1]. Bursts are left whole."""

    enabled: bool = True
    stages: list[str] = Field(
        default_factory=lambda: ["preprocess", "ratelimit", "dedup", "cache", "route", "batch"],
        description="stages whose latency is queueing (preprocess's: the wait in "
        "llm.requests): their mean latencies are summed",
    )
    target_s: float = Field(default=1.0, gt=0)
    interval_s: float = Field(default=1.0, gt=0)
    decrease: float = Field(default=0.8, gt=0, lt=1)
    increase: float = Field(default=0.05, gt=0, le=1)
    min_scale: float = Field(default=0.1, gt=0, le=1)


class RateLimits(Section):
    default: Quota = Quota()
    tenants: dict[str, Quota] = Field(default_factory=dict)
    max_buckets_per_tenant: int = Field(
        default=1000,
        ge=1,
        description="user and api type buckets kept per tenant; the least recently used go",
    )
    redelivery_window_s: float = Field(
        default=300.0,
        gt=0,
        description="how long after charging a tenant an event redelivered from its partition "
        "(a crash or rebalance before the offset commit) is known and not charged again",
    )
    adaptive: AdaptiveLimit = AdaptiveLimit()

    def for_tenant(self, tenant: str) -> Quota:
        return self.tenants.get(tenant, self.default)


class Limits(Section):
    max_message_bytes: int = 64 * 1024
    max_tokens: int = 32768
    intake_pause_backlog_ms: float | None = Field(
        default=None,
        gt=0,
        description="preprocess takes no new requests while the hops between this worker's "
        "stages took longer than this (their median over the last second): new requests "
        "wait in llm.requests, where `shed_queued_ms` sheds them before any work, and the "
        "admitted ones keep short queues; null: never",
    )
    shed_queued_ms: float | None = Field(
        default=None,
        gt=0,
        description="a request that waited longer than this in llm.requests (by its Kafka "
        "timestamp) is answered `overloaded` before any other work, high priority excepted; "
        "null: never (the backlog a crashed worker leaves waits longer than a session "
        "timeout, and would be shed whole)",
    )


class ClientSettings(Section):
    """`LLMFlowClient`'s adaptive throttling (`llmflow.throttle`): it sends about
    `throttle_k` times what the pipeline accepted over the last `throttle_window_s` and
    answers the rest `overloaded` itself, but always sends at least 1 -
    `throttle_max_probability` of what it is asked to; null (the default): it sends every
    request. The Google SRE book suggests 2; `llmflow bench overload` measures it."""

    throttle_k: float | None = Field(default=None, ge=1.0)
    throttle_window_s: float = Field(default=10.0, ge=1.0, description="counted by second")
    throttle_min_requests: int = Field(
        default=100, ge=0, description="no refusal while the window holds fewer requests"
    )
    throttle_max_probability: float = Field(default=0.9, gt=0.0, le=1.0)


class DedupSettings(Section):
    lock_timeout_s: float = 60.0
    max_followers: int = 1000
    max_follower_bytes: int = Field(default=512 * 1024, description="per in-flight entry")


VOLATILE_TERMS = (
    *"today tonight tomorrow yesterday now currently current latest recent recently".split(),
    *"newest breaking live news headlines weather forecast price prices stock stocks".split(),
    *"score scores standings traffic trending".split(),
    "exchange rate",
    "this week",
    "this month",
    "this year",
)


class CacheSettings(Section):
    """Exact-layer bounds, and how long answers live by how fast their truth changes."""

    ttl_s: float = 3600.0
    max_entries_per_partition: int = 10000
    volatile_ttl_s: float = Field(
        default=300.0, gt=0, description="for questions about the present (volatile_terms)"
    )
    volatile_terms: list[str] = Field(
        default_factory=lambda: list(VOLATILE_TERMS),
        description="words or phrases that make a question's answer age fast",
    )


class SemanticCacheSettings(Section):
    """The semantic layer of cache and merging (`agents.semantic`).

    The default threshold comes from `llmflow eval-pairs` on evaluation/pairs/pairs.jsonl,
    chosen on its dev half: with the exact guards on it keeps about 91 % of paraphrases and
    no hard negative on either half. The guards, not the threshold, stop negations,
    antonyms and changed numbers, identifiers, dates, entities, order and scope.
    Namespaces are tenants, or the shared namespaces listed here.
    """

    enabled: bool = Field(
        default=False, description="serve near-repeats from the cache; needs embedding.enabled"
    )
    threshold: float = Field(default=0.83, gt=0.0, le=1.0, description="cosine, unit vectors")
    namespace_thresholds: dict[str, float] = Field(default_factory=dict)
    shared_namespaces: list[str] = Field(
        default_factory=list, description="namespaces tenants may share via cache_namespace"
    )
    max_entries: int = Field(default=10000, ge=1, description="per partition; LRU-2 evicts")
    l2_group_size: int = Field(
        default=64, ge=1, description="newest entries kept in Redis per context and LSH bucket"
    )
    ttl_s: float = Field(default=3600.0, gt=0)
    adaptive: bool = Field(default=False, description="learn a threshold per entry")
    verify_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="adaptive: share of semantic hits asked of the model instead, to learn from",
    )
    delta: float = Field(default=0.01, gt=0.0, lt=1.0, description="false-hit bound per entry")
    min_observations: int = Field(default=20, ge=1, description="before an entry may loosen")

    def threshold_for(self, namespace: str) -> float:
        return self.namespace_thresholds.get(namespace, self.threshold)


class BatchSettings(Section):
    """Bounds within which each model's batch size and wait adapt to its load."""

    min_size: int = Field(default=4, ge=1)
    max_size: int = Field(default=16, ge=1)
    min_wait_ms: float = Field(default=50.0, ge=0)
    max_wait_ms: float = Field(default=200.0, ge=0)
    max_queued: int = Field(default=4096, ge=1)
    headroom: float = Field(default=1.25, ge=1.0, description="target size over the least")
    rate_window_s: float = Field(default=1.0, gt=0, description="arrival-rate time constant")


class ClassTimeout(Section):
    """How long infer may spend on a request of one class, and on each call of it: a
    hung call costs `attempt_share` of the time, so the rest is left for retries."""

    total_s: float = Field(gt=0)
    attempt_share: float = Field(default=1 / 3, gt=0, le=1)


def default_timeouts() -> dict[RequestClass, ClassTimeout]:
    return {
        RequestClass.SIMPLE: ClassTimeout(total_s=30.0),
        RequestClass.COMPLEX: ClassTimeout(total_s=120.0),
        RequestClass.BATCH: ClassTimeout(total_s=300.0),
    }


class BreakerSettings(Section):
    """A circuit breaker per deployment. It opens when, over the last `window_s`, at least
    `min_calls` calls saw a share of failures of `failure_rate` or more, or when
    `max_failures` failed (when set); open, it refuses calls for `cooldown_s`, then lets
    `half_open_probes` calls through: a success closes it, a failure opens it again.
    Failures are retryable errors and timeouts, not requests a model refused."""

    window_s: float = Field(default=30.0, gt=0)
    min_calls: int = Field(default=20, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    max_failures: int | None = Field(default=None, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)


class InferSettings(Section):
    """Timeouts, retries, breakers and fallbacks of the infer stage (`agents.failover`).

    Four attempts per model (`retries` 3) and a second model keep requests failing below
    one in a thousand when 35 % of calls fail (`llmflow bench faults`).
    """

    timeouts: dict[RequestClass, ClassTimeout] = Field(default_factory=default_timeouts)
    retries: int = Field(default=3, ge=0)
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    max_concurrency: int = 256
    breaker: BreakerSettings = BreakerSettings()
    fallbacks: dict[str, list[str]] = Field(
        default_factory=lambda: {"sim-small": ["sim-large"]},
        description="models that stand in, in order, when a model fails: full answers",
    )
    degrade: bool = Field(
        default=True,
        description="once the chain failed: a cached answer, else a cheaper model's, marked",
    )


RoutePolicy = Literal["rules", "quality", "cascade", "ensemble"]


class RouteSettings(Section):
    """How the route stage picks a model for a request without a model hint.

    The complexity classifier predicts each model it knows (the zoo) answering a prompt
    right. A prompt none of them is likely to answer (`task_floor`) is chat and goes by the
    rules: short prompts to `small_model`, long ones to `large_model`. Otherwise `quality`
    takes the cheapest model predicted right with at least `quality_threshold` (RouteLLM's
    cost/quality knob), and `cascade` starts with the cheapest and lets postprocess escalate
    an answer whose least likely token is below `cascade_confidence` (FrugalGPT).
    `ensemble` also starts with the cheapest, which answers `ensemble_samples` times; the
    answers' weighted vote stands unless its agreement is below `ensemble_agreement`, when
    postprocess escalates as in the cascade (self-consistency). These defaults come from
    `llmflow eval-router` on the held-aside task mix.

    The history of similar requests (same LSH bucket, else same task type) scales each
    model's predicted chance by the share of its answers there that were neither
    escalated nor failed, once it has `history_min_observations` of its last
    `history_window`, never below `history_floor`. Its defaults are a first guess: the
    evaluation routes every item before any is answered, so it cannot tune them.
    """

    policy: RoutePolicy = "quality"
    small_model: str = "sim-small"
    large_model: str = "sim-large"
    small_max_prompt_tokens: int = 512
    classifier: str | None = Field(
        default=str(ZOO / "classifier"), description="None: rules only, no classifier"
    )
    task_floor: float = Field(default=0.2, ge=0.0, le=1.0)
    quality_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    cascade_confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    ensemble_samples: int = Field(default=3, ge=1, description="self-consistency samples")
    ensemble_temperature: float = Field(default=0.7, gt=0.0, le=2.0)
    ensemble_agreement: float = Field(
        default=1.0, ge=0.0, le=1.0, description="below this share of votes, escalate"
    )
    history_window: int = Field(default=100, ge=1, description="outcomes kept per key and model")
    history_min_observations: int = Field(
        default=20, ge=1, description="before this many, the history does not count"
    )
    history_floor: float = Field(
        default=0.5, ge=0.0, le=1.0, description="the history scales a prediction by at least this"
    )
    history_max_keys: int = Field(
        default=10_000, ge=1, description="similar-request keys remembered, least recent dropped"
    )
    tenant_budgets_usd: dict[str, float] = Field(
        default_factory=dict,
        description="spend per budget window; past it a tenant gets the cheapest fitting model",
    )
    budget_window_s: float = Field(default=3600.0, gt=0)
    latency_decay_s: float = Field(default=10.0, gt=0, description="peak-EWMA time constant")
    error_decay: float = Field(default=0.9, gt=0.0, lt=1.0, description="error-rate EWMA weight")
    unhealthy_error_rate: float = Field(
        default=0.5, gt=0.0, le=1.0, description="a replica above it is used only if all are"
    )


class EmbeddingSettings(Section):
    """The sentence embedding of each request (all-MiniLM-L6-v2, exported by `make models`).

    Off by default: only the semantic cache reads it, and two CPU cores embed about 200
    ShareGPT prompts a second (`llmflow bench batching`), fewer when the worker is busy.
    """

    enabled: bool = False
    path: str = ".cache/models/minilm-l6-v2"
    dimension: int = Field(default=384, ge=1, description="of the model's embeddings")
    max_batch: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0)


class LocalitySettings(Section):
    """How embeddings become partitions (`streams.locality`), so near-duplicates meet.

    The defaults are what `llmflow bench locality` recommends for 4 partitions on ShareGPT
    prompts: one bit per doubling of the partitions, buckets taken modulo the partition
    count, hyperplanes through the mean embedding of 5,000 prompts. Every worker must use
    the same values, or identical prompts land on different partitions.
    """

    bits: int | None = Field(
        default=None, ge=1, le=30, description="None: log2 of the partition count"
    )
    seed: int = 20261126
    mapping: Literal["modulo", "gray", "kafka"] = "modulo"
    center: str | None = Field(
        default=str(EMBEDDING_CENTER), description="JSON with the mean embedding; None: origin"
    )


class EngineSettings(Section):
    """ONNX Runtime for local models: `auto` takes a GPU when the installed build has one."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int | None = Field(default=None, ge=1)
    max_batch: int = Field(default=16, ge=1, description="rows decoded together per step")


class ApiKey(Section):
    """Whom an API key of the HTTP ingress speaks for: its tenant, and its user when the
    key is one person's (else the body's `user` field names the user)."""

    tenant: str = Field(min_length=1, max_length=128)
    user: str | None = Field(default=None, max_length=128)


class IngressSettings(Section):
    """The OpenAI-compatible HTTP endpoint (`llmflow serve`, `llmflow.ingress`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict, description='key → {"tenant", "user"}, or key → tenant'
    )
    max_wait_s: float = Field(default=120.0, gt=0, description="longest a call waits")
    deadline_grace_s: float = Field(
        default=5.0, ge=0, description="past a deadline, the wait for the timeout answer"
    )

    @model_validator(mode="before")
    @classmethod
    def _tenant_shorthand(cls, data: Any) -> Any:
        """`{"key": "acme"}` is short for `{"key": {"tenant": "acme"}}`."""
        if isinstance(data, dict) and isinstance(data.get("api_keys"), dict):
            keys = data["api_keys"]
            expanded = {k: {"tenant": v} if isinstance(v, str) else v for k, v in keys.items()}
            return {**data, "api_keys": expanded}
        return data


class CancelSettings(Section):
    """How long each worker remembers a cancelled request id: longer than a request lives
    (the longest infer timeout is 300 s), bounded in count too."""

    remember_s: float = Field(default=900.0, gt=0)
    max_remembered: int = Field(default=100_000, ge=1)


class FeedbackSettings(Section):
    """Learning from feedback: route records each request its classifier decided (on the
    feedback stage's topic, keyed by request id like `llm.feedback`, so both meet on one
    worker, which remembers the last `max_routed` of them); the learn stage keeps the last
    `max_examples` joined examples and, every `train_after` new ones while no candidate is
    out, fine-tunes the incumbent (`train_steps` Adam steps at `learning_rate`) into a
    candidate. The candidate takes each share of `steps` in turn once it had
    `min_events_per_step` feedback events there and was not worse than the incumbent by
    more than `margin`; the last step makes it the incumbent. It is rolled back as soon as
    its share of good answers is below the incumbent's by more than `margin`, with at
    least `min_samples` events each and a one-sided two-proportion z above `z_critical`."""

    enabled: bool = True
    max_routed: int = Field(default=100_000, ge=1, description="per worker, least recent go")
    early_wait_s: float = Field(
        default=60.0, gt=0, description="how long feedback read before its record waits for it"
    )
    max_examples: int = Field(default=10_000, ge=1)
    train_after: int = Field(default=500, ge=1)
    train_steps: int = Field(default=200, ge=1)
    learning_rate: float = Field(default=0.01, gt=0)
    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0], min_length=1)
    min_events_per_step: int = Field(default=200, ge=1)
    min_samples: int = Field(default=50, ge=1)
    margin: float = Field(default=0.02, ge=0.0, le=1.0)
    z_critical: float = Field(default=1.645, gt=0.0)

    @model_validator(mode="after")
    def _check_steps(self) -> FeedbackSettings:
        if self.steps != sorted(self.steps) or not 0 < self.steps[0] or self.steps[-1] != 1.0:
            raise ValueError(f"feedback.steps must rise from above 0 to 1.0, not {self.steps}")
        return self


class StatusSettings(Section):
    """Whether requests report their progress (`llmflow status`), and how long the status
    record of a request is kept, per partition of `llm.status`."""

    enabled: bool = Field(
        default=True,
        description="three reports per request, each a message and a Table write: "
        "off, `llmflow status` knows nothing and each request costs less",
    )
    keep_finished_s: float = Field(default=600.0, gt=0, description="after its answer")
    max_age_s: float = Field(default=3600.0, gt=0, description="an unfinished one, since seen")
    max_entries: int = Field(default=100_000, ge=1, description="per partition; oldest go")


class ScalerGroup(Section):
    """One deploy group (`DEPLOY_GROUPS`, k8s Deployment `llmflow-<group>`) as `llmflow
    scaler` sizes it. `capacity_rps` is what one replica serves; measure it for your
    models and hardware, the defaults are a starting point."""

    capacity_rps: float = Field(gt=0, description="requests a second one replica serves")
    min_replicas: int = Field(default=1, ge=0)


def default_scaler_groups() -> dict[str, ScalerGroup]:
    return {
        "edge": ScalerGroup(capacity_rps=200.0),
        "core": ScalerGroup(capacity_rps=100.0),
        "infer": ScalerGroup(capacity_rps=20.0),
        "respond": ScalerGroup(capacity_rps=400.0),
    }


class ScalerSettings(Section):
    """Predictive scaling (`llmflow scaler`, `streams.forecast`): every `interval_s` the
    requests topic's end offsets give arrivals per minute; Holt's double exponential
    smoothing (`alpha` level, `beta` trend) over the last `history_minutes` forecasts the
    rate `lookahead_s` ahead (the time a pod takes to start and join the group), and each
    group's replicas follow that forecast, so capacity rises before the lag does."""

    interval_s: float = Field(default=15.0, gt=0)
    history_minutes: int = Field(default=60, ge=2)
    alpha: float = Field(default=0.5, gt=0, le=1)
    beta: float = Field(default=0.3, gt=0, le=1)
    lookahead_s: float = Field(default=120.0, ge=0, description="pod start-up time")
    groups: dict[str, ScalerGroup] = Field(default_factory=default_scaler_groups)


class Settings(Section):
    app_id: str = "llmflow"
    bootstrap_servers: str = "127.0.0.1:9092"
    consumer_fetch_max_wait_ms: int = Field(
        default=5,
        ge=0,
        description="the stages' and the client's fetch wait: Tansu does not answer a "
        "waiting fetch when a record arrives, so each hop waits on it; Apache Kafka does, "
        "and there 500 cuts the polling at idle (README, Benchmarks)",
    )
    watcher_fetch_max_wait_ms: int = Field(
        default=100,
        ge=0,
        description="the cancel and router-model watchers' poll: at the stages' 5 ms, "
        "their empty polls took about 5 % of a worker's CPU at 100 req/s (py-spy)",
    )
    replication_factor: int = Field(default=1, ge=1, description="of every topic created")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="faust's: exactly_once needs transactions (Apache Kafka, not Tansu)",
    )
    session_timeout_s: float = Field(
        default=60.0, gt=0, description="how long the group waits for a silent worker"
    )
    redis_url: str | None = None
    provider_url: str = "http://127.0.0.1:8089/v1"
    provider_api_key: str = "sim"
    metrics_port: int | None = None
    metrics_sample_s: float = Field(
        default=5.0, gt=0, description="how often a worker samples resources, efficiency, lag"
    )
    worker_stages: list[str] = Field(
        default_factory=list,
        description="the stages this worker runs (a JSON list or comma separated); empty: all",
    )
    fusion: Fusion = Field(
        default="local",
        description="a stage hands a request to the next one in process, without a Kafka hop, "
        "where this worker runs both and owns the partition the request would reach: "
        "'key' only between stages of one key and partition count, 'local' between any, "
        "but by key under exactly-once (Settings.fuses); true reads as 'key'",
    )
    data_dir: str = ".cache/worker"
    table_store: Literal["memory://", "rocksdb://"] = Field(
        default="memory://",
        description="where Tables live between changelog recoveries: rocksdb keeps them on disk",
    )
    topics: Topics = Topics()
    ingress: IngressSettings = IngressSettings()
    stages: list[StageSpec] = Field(default_factory=default_stages)
    tables: dict[str, str] = Field(default_factory=default_tables)
    models: list[ModelSpec] = Field(default_factory=default_models)
    limits: Limits = Limits()
    client: ClientSettings = ClientSettings()
    ratelimit: RateLimits = RateLimits()
    dedup: DedupSettings = DedupSettings()
    cache: CacheSettings = CacheSettings()
    semantic: SemanticCacheSettings = SemanticCacheSettings()
    batch: BatchSettings = BatchSettings()
    infer: InferSettings = InferSettings()
    route: RouteSettings = RouteSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    locality: LocalitySettings = LocalitySettings()
    engine: EngineSettings = EngineSettings()
    cancel: CancelSettings = CancelSettings()
    status: StatusSettings = StatusSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    scaler: ScalerSettings = ScalerSettings()

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion_from_bool(cls, value: Any) -> Any:
        """`LLMFLOW_FUSION=true`, from before fusion across keys, still means 'key'."""
        if isinstance(value, bool) or value in ("true", "false"):
            return "key" if value in (True, "true") else "off"
        return value

    @field_validator("worker_stages", mode="before")
    @classmethod
    def _split_stage_names(cls, value: Any) -> Any:
        """`LLMFLOW_WORKER_STAGES=dedup,cache` reads as a list, as a JSON list does."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check_graph(self) -> Settings:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        shared = {s.topic.partitions for s in self.stages if s.key_by in COPARTITIONED}
        if len(shared) > 1:
            raise ValueError(
                "stages keyed by fingerprint or locality share Tables, so their topics need "
                f"one partition count, not {sorted(shared)}"
            )
        for table, stage in self.tables.items():
            if stage not in names:
                raise ValueError(f"table {table!r} names stage {stage!r}, not in the graph")
        unknown_groups = sorted(set(self.scaler.groups) - set(DEPLOY_GROUPS))
        if unknown_groups:
            raise ValueError(f"scaler.groups names unknown deploy groups {unknown_groups}")
        self._check_worker_stages()
        if self.semantic.enabled and not self.embedding.enabled:
            raise ValueError("semantic.enabled needs embedding.enabled: it matches embeddings")
        known = {m.name for m in self.models}
        for model in (self.route.small_model, self.route.large_model):
            if model not in known:
                raise ValueError(f"route model {model!r} is not in the model registry")
        for model, chain in self.infer.fallbacks.items():
            unknown = sorted({model, *chain} - known)
            if unknown:
                raise ValueError(f"infer.fallbacks of {model!r} name unknown models {unknown}")
        return self

    def _check_worker_stages(self) -> None:
        known = self.stage_names()
        unknown = [name for name in self.worker_stages if name not in known]
        if unknown:
            raise ValueError(f"worker_stages names unknown stages {unknown}; known: {known}")
        sharing = self.table_sharing_stages()
        left_out = [name for name in sharing if not self.runs(name)]
        if left_out and len(left_out) < len(sharing):
            raise ValueError(
                f"worker_stages {self.worker_stages} splits {sharing}: they share the in-flight "
                f"and cache Tables and the index over them, so a worker runs all of them or "
                f"none (add {left_out})"
            )

    def stage_names(self) -> list[str]:
        """Every stage a worker can run, in the order of the path."""
        return [ENTRY_STAGE, *(s.name for s in self.stages)]

    def table_sharing_stages(self) -> list[str]:
        """Stages keyed by fingerprint or locality: postprocess releases the followers dedup
        parked and writes the cache's Tables, and route and postprocess share one Router."""
        return [s.name for s in self.stages if s.key_by in COPARTITIONED]

    def runs(self, stage: str) -> bool:
        """Whether this worker attaches `stage` (`worker_stages` empty: every stage)."""
        return not self.worker_stages or stage in self.worker_stages

    def fuses(self, sender: str, receiver: str) -> bool:
        """Whether `sender` may call `receiver` in process when this worker owns the
        partition the request would reach (`Pipeline.send`). With 'key' a request keeps
        its key and partition number across the two topics; with 'local' any stage may
        hand to any other this worker runs, except under exactly-once, where it fuses as
        'key' does: a Table write for another partition number would commit in the
        consumed partition's transaction, which a rebalance that moves only one of the two
        could split. A stage never fuses into itself."""
        if self.fusion == "off" or sender == receiver or not self.runs(receiver):
            return False
        specs = {s.name: s for s in self.stages}
        before, after = specs.get(sender), specs.get(receiver)
        if after is None or (before is None and sender != ENTRY_STAGE):
            return False
        if self.fusion == "local" and self.processing_guarantee != "exactly_once":
            return True
        if before is None:
            return False
        same_partitions = before.topic.partitions == after.topic.partitions
        return before.key_by == after.key_by and same_partitions

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"no stage {name!r} in the stage graph")

    def locality_bits(self) -> int:
        """LSH bits: as set, else enough for one bucket per partition of the stages keyed
        by locality."""
        if self.locality.bits is not None:
            return self.locality.bits
        counts = [s.topic.partitions for s in self.stages if s.key_by == "locality"]
        return max(1, (max(counts, default=2) - 1).bit_length())

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def all_topics(self) -> list[TopicSpec]:
        wire = [
            self.topics.requests,
            self.topics.responses,
            self.topics.stream,
            self.topics.dlq,
            self.topics.feedback,
            self.topics.cancel,
            self.topics.router_models,
        ]
        return wire + [s.topic for s in self.stages] + self.changelog_topics()

    def namespaced(self, prefix: str) -> Settings:
        """A copy whose app id and every topic name start with `prefix`, so a second
        pipeline on the same brokers consumes none of this one's topics."""

        def rename(topic: TopicSpec) -> TopicSpec:
            return topic.model_copy(update={"name": f"{prefix}{topic.name}"})

        topics = {
            name: rename(getattr(self.topics, name)) for name in type(self.topics).model_fields
        }
        return self.model_copy(
            update={
                "app_id": f"{prefix}{self.app_id}",
                "topics": self.topics.model_copy(update=topics),
                "stages": [s.model_copy(update={"topic": rename(s.topic)}) for s in self.stages],
            }
        )

    def changelog_topics(self) -> list[TopicSpec]:
        """faust's changelog topic of each Table, made up front so workers never race to."""
        return [
            TopicSpec(
                name=f"{self.app_id}-{table}-changelog",
                partitions=self.stage(stage).topic.partitions,
                compacted=True,
            )
            for table, stage in self.tables.items()
        ]


def _parse_env_value(raw: str) -> Any:
    """Objects, arrays and quoted strings are JSON; other scalars stay text for pydantic to
    coerce, so an API key of digits stays a string. `null` means unset."""
    text = raw.strip()
    if text == "null":
        return None
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = {}
            tree[part] = node
        tree = node
    tree[path[-1]] = value


def env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] in Settings.model_fields:
            _set_path(tree, path, _parse_env_value(raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    env = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    file = path or env.get(f"{ENV_PREFIX}CONFIG")
    if file:
        data = json.loads(Path(file).read_text())
    return Settings.model_validate(_merge(data, env_overrides(env)))


def to_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings."""
    return {
        f"{ENV_PREFIX}{name.upper()}": json.dumps(value)
        for name, value in settings.model_dump(mode="json").items()
    }

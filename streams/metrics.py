"""Prometheus metrics every worker exposes: per-stage latency, terminal outcomes, the
cache and merge rates, model calls (latency, tokens, spend), routing outcomes, and what a
periodic sample finds (resource use, parallel efficiency, consumer lag)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Set
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from faust.types import TP
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.messages import Envelope, Result, Status

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

stage_latency = Histogram(
    "llmflow_stage_latency_seconds",
    "Time a request spent in a stage, its input queue included",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
request_latency = Histogram(
    "llmflow_request_latency_seconds",
    "Time from entering the pipeline to the terminal response",
    ["status"],
    buckets=LATENCY_BUCKETS,
)
responses = Counter("llmflow_responses_total", "Terminal responses published", ["status", "code"])
stage_events = Counter(
    "llmflow_stage_events_total", "What each stage decided per request", ["stage", "outcome"]
)
fused_sends = Counter(
    "llmflow_fused_sends_total",
    "Requests a stage handed to the next in process, without a Kafka hop (Settings.fusion)",
    ["stage", "next_stage"],
)
dead_letters = Counter("llmflow_dead_letters_total", "Messages sent to the DLQ", ["reason"])
upstream_calls = Counter(
    "llmflow_upstream_calls_total", "Calls to model backends", ["model", "outcome"]
)
batch_size = Histogram(
    "llmflow_batch_size",
    "Requests per dispatched batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
circuit_state = Gauge(
    "llmflow_circuit_state",
    "Circuit breaker of each deployment on this worker: 0 closed, 1 half-open, 2 open",
    ["model"],
)
circuit_transitions = Counter(
    "llmflow_circuit_transitions_total",
    "Breaker state changes, by the state entered",
    ["model", "state"],
)
fallbacks = Counter(
    "llmflow_fallbacks_total",
    "Requests that left a failing model for the next of its chain or a degraded answer",
    ["model", "reason"],
)
degraded_answers = Counter(
    "llmflow_degraded_answers_total", "Answers given once every model of the chain failed", ["kind"]
)
ratelimit_refusals = Counter(
    "llmflow_ratelimit_refusals_total",
    "Requests answered rate_limited, by the limit that refused and the request's priority",
    ["limit", "priority"],
)
ratelimit_scale = Gauge(
    "llmflow_ratelimit_scale",
    "Share of the configured refill rates this worker's adaptive limit lets through",
)
ratelimit_load = Gauge(
    "llmflow_ratelimit_load_seconds",
    "Queueing the adaptive limit saw over its last interval: summed mean stage latencies",
)
ratelimit_evictions = Counter(
    "llmflow_ratelimit_evictions_total",
    "User or api type buckets dropped by the per-tenant bound before they had refilled",
)


cache_lookups = Counter(
    "llmflow_cache_lookups_total", "Cache lookups by kind and outcome", ["kind", "outcome"]
)
cache_evictions = Counter(
    "llmflow_cache_evictions_total",
    "Cache entries removed by the size bound or expiry, by kind",
    ["kind", "reason"],
)
cache_faults = Counter(
    "llmflow_cache_faults_total",
    "Cache and embedding faults that degraded a lookup or a store to a miss",
    ["kind", "fault"],
)
cache_hit_rate_by_type = Gauge(
    "llmflow_cache_hit_rate_by_type",
    "Share of this worker's recent lookups of each cache kind that hit",
    ["kind"],
)
request_deduplication_rate = Gauge(
    "llmflow_request_deduplication_rate",
    "Share of this worker's recent requests that waited on an identical one in flight",
)
forecast_arrival_rate = Gauge(
    "llmflow_forecast_arrival_rate",
    "Requests a second llmflow scaler expects one pod start-up ahead (streams.forecast)",
)
predicted_replicas = Gauge(
    "llmflow_predicted_replicas",
    "Replicas a deploy group needs for the forecast rate, within its partitions",
    ["group"],
)
RECENT = 1000


class RecentShare:
    """The share of true outcomes among the last `size`: a rate that follows the
    present, where a ratio of counters since start would barely move."""

    def __init__(self, gauge: Gauge, size: int = RECENT) -> None:
        self.gauge = gauge
        self.outcomes: deque[bool] = deque(maxlen=size)
        self.true = 0

    def add(self, outcome: bool) -> float:
        if len(self.outcomes) == self.outcomes.maxlen and self.outcomes[0]:
            self.true -= 1
        self.outcomes.append(outcome)
        self.true += outcome
        share = self.true / len(self.outcomes)
        self.gauge.set(share)
        return share


recent_hits: dict[str, RecentShare] = {}
recent_merges = RecentShare(request_deduplication_rate)


def count_cache_lookup(kind: str, hit: bool) -> None:
    cache_lookups.labels(kind, "hit" if hit else "miss").inc()
    share = recent_hits.get(kind)
    if share is None:
        share = recent_hits[kind] = RecentShare(cache_hit_rate_by_type.labels(kind))
    share.add(hit)


batch_processing_latency = Histogram(
    "llmflow_batch_processing_latency_seconds",
    "Time from a batch's dispatch to every request of it answered by infer",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
upstream_latency = Histogram(
    "llmflow_upstream_latency_seconds",
    "Time of each successful model call (one attempt), streaming included",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
overhead_latency = Histogram(
    "llmflow_overhead_latency_seconds",
    "A request's time in the pipeline minus its time in infer's model calls (retries and "
    "backoff included): what llmflow itself adds; merged followers are left out, since "
    "they wait on their leader's call",
    buckets=LATENCY_BUCKETS,
)
tokens = Counter("llmflow_tokens_total", "Tokens billed by model calls, by kind", ["model", "kind"])
spend = Counter(
    "llmflow_spend_usd_total", "What model calls cost, by model and tenant", ["model", "tenant"]
)
requests_in_flight = Gauge(
    "llmflow_requests_in_flight",
    "Model calls this worker has waiting on an upstream now: its share of the upstream load",
)
routing_outcomes = Counter(
    "llmflow_routing_outcomes_total",
    "Routed answers by what became of them: stood, escalated to a stronger model, or failed",
    ["model", "outcome"],
)
model_routing_accuracy = Gauge(
    "llmflow_model_routing_accuracy",
    "Share of this worker's recent routed answers of each model that stood",
    ["model"],
)
parallel_processing_efficiency = Gauge(
    "llmflow_parallel_processing_efficiency",
    "Over the last sample interval's batches: the time requests spent in their own model "
    "calls over the time their batches took (per request, at most 1). 1 when every request "
    "of a batch is answered as fast as its own call; lower when requests wait on slower "
    "batchmates, on call slots or on retries' backoff",
)
resource_utilization_rate = Gauge(
    "llmflow_resource_utilization_rate",
    "Share of this worker's resources in use: cpu is process CPU seconds per second over "
    "the cores it may use; memory is resident memory over its limit (cgroup, else RAM)",
    ["resource"],
)
consumer_lag = Gauge(
    "llmflow_consumer_lag",
    "Messages of each assigned partition not yet committed: its end offset when last "
    "fetched minus the offset this worker last committed (partitions it has committed)",
    ["topic", "partition"],
)


@contextmanager
def batch_processing(model: str, size: int) -> Iterator[None]:
    """Time one dispatched batch; its request-seconds are the efficiency's denominator.
    Its calls' time joins the efficiency with its own when it ends, so a sample between
    the last call's end and the batch's cannot put the two in different intervals."""
    started = time.monotonic()
    batch = Efficiency()
    token = running_batch.set(batch)
    try:
        yield
    finally:
        running_batch.reset(token)
        seconds = time.monotonic() - started
        batch_processing_latency.labels(model).observe(seconds)
        batch.capacity = size * seconds
        efficiency.add(batch)


@contextmanager
def upstream_call(model: str) -> Iterator[None]:
    """One attempt at a model: counted in flight while it runs, its time in the
    efficiency's numerator, and in the latency histogram when it succeeds."""
    started = time.monotonic()
    requests_in_flight.inc()
    try:
        yield
        upstream_latency.labels(model).observe(time.monotonic() - started)
    finally:
        requests_in_flight.dec()
        (running_batch.get() or efficiency).busy += time.monotonic() - started


@contextmanager
def in_upstream(envelope: Envelope) -> Iterator[None]:
    """Charge the time `envelope` spends in infer's calls to it, for its overhead."""
    started = time.monotonic()
    try:
        yield
    finally:
        envelope.upstream_ms += (time.monotonic() - started) * 1000.0


def count_usage(model: str, tenant: str, result: Result) -> None:
    tokens.labels(model, "prompt").inc(result.usage.prompt_tokens)
    tokens.labels(model, "completion").inc(result.usage.completion_tokens)
    spend.labels(model, tenant).inc(result.cost_usd)


def overhead_seconds(envelope: Envelope, latency_s: float) -> float | None:
    """The pipeline's own share of a request's latency; None for a merged follower."""
    if envelope.status is Status.MERGED:
        return None
    return max(0.0, latency_s - envelope.upstream_ms / 1000.0)


def observe_overhead(envelope: Envelope, latency_s: float) -> None:
    overhead = overhead_seconds(envelope, latency_s)
    if overhead is not None:
        overhead_latency.observe(overhead)


def routing_outcome(stood: bool, answered: bool) -> str:
    """An answer that did not stand was escalated if the model answered, else it failed."""
    if stood:
        return "stood"
    return "escalated" if answered else "failed"


recent_routing: dict[str, RecentShare] = {}


def count_routing_outcome(model: str, stood: bool, answered: bool) -> None:
    routing_outcomes.labels(model, routing_outcome(stood, answered)).inc()
    share = recent_routing.get(model)
    if share is None:
        share = recent_routing[model] = RecentShare(model_routing_accuracy.labels(model))
    share.add(stood)


class Efficiency:
    """Request-seconds in model calls over request-seconds in batches, per interval."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.capacity = 0.0

    def add(self, other: Efficiency) -> None:
        self.busy += other.busy
        self.capacity += other.capacity

    def sample(self) -> float | None:
        """The interval's ratio (None when no batch ran), and a new interval begins."""
        busy, capacity = self.busy, self.capacity
        self.busy = self.capacity = 0.0
        if capacity <= 0.0:
            return None
        return min(1.0, busy / capacity)


efficiency = Efficiency()
# The batch `batch_processing` runs in this context (its calls run in tasks that inherit it).
running_batch: ContextVar[Efficiency | None] = ContextVar("running_batch", default=None)


def cgroup_value(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cores_available(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """The cgroup's CPU quota in cores, else the CPUs this process may run on."""
    quota = (cgroup_value(cgroup / "cpu.max") or "max").split()
    if quota[0] != "max" and len(quota) == 2:
        return int(quota[0]) / int(quota[1])
    return float(len(os.sched_getaffinity(0)))


def memory_available(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """The cgroup's memory limit, else the machine's RAM."""
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    limit = cgroup_value(cgroup / "memory.max") or "max"
    return min(ram, float(limit)) if limit != "max" else ram


def resident_bytes() -> float:
    fields = Path("/proc/self/statm").read_text().split()
    return float(int(fields[1]) * os.sysconf("SC_PAGE_SIZE"))


class ResourceUse:
    """CPU and memory shares between samples; readers are passed in so tests drive it."""

    def __init__(
        self,
        cores: float,
        memory_bytes: float,
        cpu_seconds: Callable[[], float] = time.process_time,
        rss_bytes: Callable[[], float] = resident_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = cores
        self.memory_bytes = memory_bytes
        self.cpu_seconds = cpu_seconds
        self.rss_bytes = rss_bytes
        self.clock = clock
        self._cpu, self._at = cpu_seconds(), clock()

    def sample(self) -> dict[str, float]:
        cpu, now = self.cpu_seconds(), self.clock()
        wall = max(now - self._at, 1e-9)
        shares = {
            "cpu": (cpu - self._cpu) / wall / self.cores,
            "memory": self.rss_bytes() / self.memory_bytes,
        }
        self._cpu, self._at = cpu, now
        return shares


def partition_lag(
    assigned: Set[TP], end: Mapping[TP, int], committed: Mapping[TP, int]
) -> dict[TP, int]:
    """Lag of each assigned partition that has both offsets (changelogs, read only in
    recovery, have no commits, and a partition nothing has reached yet has no end)."""
    return {tp: max(0, end[tp] - committed[tp]) for tp in assigned if tp in end and tp in committed}


class WorkerSampler:
    """What the worker's periodic timer samples: resources, efficiency, consumer lag."""

    def __init__(self, resources: ResourceUse) -> None:
        self.resources = resources
        self.lagging: set[TP] = set()

    def sample(self, assigned: Set[TP], end: Mapping[TP, int], committed: Mapping[TP, int]) -> None:
        """`end` and `committed` are the offsets faust's monitor last saw per partition."""
        for resource, share in self.resources.sample().items():
            resource_utilization_rate.labels(resource).set(share)
        ratio = efficiency.sample()
        if ratio is not None:
            parallel_processing_efficiency.set(ratio)
        lags = partition_lag(assigned, end, committed)
        for tp in self.lagging - set(lags):
            consumer_lag.remove(tp.topic, str(tp.partition))
        for tp, lag in lags.items():
            consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
        self.lagging = set(lags)


def worker_sampler() -> WorkerSampler:
    return WorkerSampler(ResourceUse(cores_available(), memory_available()))


def serve(port: int) -> None:
    start_http_server(port, addr="0.0.0.0")


# Learning from feedback (agents.feedback, agents.learn, agents.rollout).
router_model_feedback = Counter(
    "llmflow_router_model_feedback_total",
    "Feedback events by the arm whose router model routed the request (incumbent or "
    "candidate; unjoined: its routed record did not come in time, was another tenant's or "
    "was used up) and outcome (good, bad, unlabelled)",
    ["arm", "outcome"],
)
router_model_rollouts = Counter(
    "llmflow_router_model_rollouts_total",
    "Router model rollout events: published, promoted, adopted, rolled_back",
    ["event"],
)
router_model_candidate_share = Gauge(
    "llmflow_router_model_candidate_share", "Share of requests the candidate router model routes"
)
router_model_good_share = Gauge(
    "llmflow_router_model_good_share",
    "Share of good feedback in the current rollout step, per arm (learn stage's worker)",
    ["arm"],
)
router_model_reloads = Counter(
    "llmflow_router_model_reloads_total", "Router model versions this worker loaded without restart"
)

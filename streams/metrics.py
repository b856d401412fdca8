"""Prometheus metrics every worker exposes: per-stage latency, terminal outcomes, and the
cache and merge rates."""

from __future__ import annotations

from collections import deque

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


def serve(port: int) -> None:
    start_http_server(port, addr="0.0.0.0")

"""Prometheus metrics every worker exposes: per-stage latency and terminal outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

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


def serve(port: int) -> None:
    start_http_server(port, addr="0.0.0.0")

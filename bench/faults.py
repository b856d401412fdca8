"""`llmflow bench faults`: how many requests infer answers in time when the provider fails.

The simulated provider runs as a child process (as `llmflow up` starts it) with error,
timeout (hang) and rate-limit rates; requests go at a steady Poisson rate, half routed to
each of the route's two models, each with a deadline, through the infer stage's own
`InferenceRunner` in this process (no broker: this measures the failure handling, not the
pipeline's hops). It reports `answered_in_time` (target ≥ 0.999): the share answered
within the deadline, degraded answers included, and beside it the share answered in full
by the routed model or its fallback chain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter as PromCounter
from tqdm import tqdm

from agents.infer import InferenceRunner
from llmflow.reports import print_rows, write_report
from llmflow.stack import SimulatedProvider
from schemas.messages import ChatMessage, Envelope, LLMRequest, Role, Status
from streams import metrics
from streams.drivers.backends import open_backends
from topology.settings import Settings, load_settings


@dataclass(frozen=True)
class Answer:
    """What one request got: `outcome` is ok, degraded_<kind> or error_<reason>."""

    routed: str
    sent_at: float
    outcome: str
    latency_s: float
    in_time: bool
    answered_by: str | None


def outcome_of(envelope: Envelope) -> str:
    result = envelope.result
    if envelope.status is Status.ERROR or result is None or result.error is not None:
        reason = result.error.reason if result is not None and result.error else "no_result"
        return f"error_{reason}"
    return f"degraded_{result.degraded}" if result.degraded else "ok"


def counter_values(counter: PromCounter) -> dict[str, float]:
    """A labelled counter's totals, keyed by its label values joined with '/'."""
    values: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values["/".join(sample.labels.values())] = sample.value
    return values


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {
        k: int(v - before.get(k, 0.0)) for k, v in sorted(after.items()) if v > before.get(k, 0)
    }


def percentile_ms(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ranked = sorted(values)
    return round(ranked[min(len(ranked) - 1, int(share * len(ranked)))] * 1000.0, 1)


def sent_rate(answers: list[Answer]) -> float:
    """The rate requests really went out at: a busy machine may fall behind the one asked."""
    sent = [a.sent_at for a in answers]
    span = max(sent) - min(sent) if sent else 0.0
    return round((len(sent) - 1) / span, 1) if span > 0 else 0.0


def summarize(answers: list[Answer]) -> dict[str, Any]:
    """The target share and what stood behind it, overall and per routed model."""
    count = len(answers)
    outcomes = Counter(a.outcome for a in answers)
    served = [a for a in answers if not a.outcome.startswith("error_")]
    in_time = [a for a in served if a.in_time]
    full = [a for a in in_time if a.outcome == "ok"]
    latencies = [a.latency_s for a in served]
    return {
        "requests": count,
        "answered_in_time": round(len(in_time) / count, 5) if count else 0.0,
        "answered_in_full_in_time": round(len(full) / count, 5) if count else 0.0,
        "outcomes": dict(sorted(outcomes.items())),
        "answered_late": len(served) - len(in_time),
        "answered_by": dict(sorted(Counter(a.answered_by or "-" for a in served).items())),
        "latency_p50_ms": percentile_ms(latencies, 0.5),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "latency_max_ms": percentile_ms(latencies, 1.0),
    }


async def send_all(
    settings: Settings, count: int, rate: float, deadline_s: float, seed: int
) -> list[Answer]:
    """Poisson arrivals, each request answered by the runner on its own, as the batch stage
    runs an HTTP model's batches of one."""
    backends = open_backends(settings)
    runner = InferenceRunner(settings, backends, seed=seed)
    models = [settings.route.small_model, settings.route.large_model]
    rng = random.Random(seed)
    progress = tqdm(total=count, desc="requests", unit="req")

    async def one(index: int) -> Answer:
        routed = models[index % len(models)]
        started = time.time()
        request = LLMRequest(
            id=f"fault-{index}",
            tenant="bench",
            messages=[ChatMessage(role=Role.USER, content=f"question {index}: why retry?")],
            deadline=started + deadline_s,
        )
        envelope = Envelope(request=request, model=routed, prompt_tokens=8)
        await runner.run([envelope])
        finished = time.time()
        progress.update()
        result = envelope.result
        return Answer(
            routed=routed,
            sent_at=started,
            outcome=outcome_of(envelope),
            latency_s=finished - started,
            in_time=finished <= started + deadline_s,
            answered_by=result.model if result is not None else None,
        )

    tasks = []
    loop = asyncio.get_running_loop()
    arrival = loop.time()
    try:
        for index in range(count):
            # Sleep to each arrival's own time, so a slow loop does not lower the rate.
            await asyncio.sleep(max(0.0, arrival - loop.time()))
            tasks.append(asyncio.create_task(one(index)))
            arrival += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))
    finally:
        progress.close()
        await backends.close()


def provider_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as reply:
        stats: dict[str, Any] = json.loads(reply.read())
    return stats


def run(args: argparse.Namespace) -> int:
    knobs = {
        "latency_ms": args.latency_ms,
        "error_rate": args.error_rate,
        "timeout_rate": args.timeout_rate,
        "rate_limit_rate": args.rate_limit_rate,
        "hang_s": args.hang_s,
        "seed": args.seed,
    }
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in knobs.items()]
    provider = SimulatedProvider(Path(tempfile.mkdtemp(prefix="llmflow-faults-")), flags)
    url = provider.start()
    try:
        settings = load_settings(args.config).model_copy(update={"provider_url": url})
        before = {c: counter_values(c) for c in (metrics.fallbacks, metrics.circuit_transitions)}
        started = time.monotonic()
        answers = asyncio.run(
            send_all(settings, args.requests, args.rate, args.deadline_s, args.seed)
        )
        wall_s = time.monotonic() - started
        stats = provider_stats(provider.base_url)
    finally:
        provider.stop()
    report = {
        "mode": "in-process InferenceRunner against the simulated provider (child process)",
        "provider": knobs,
        "rate_per_s": args.rate,
        "sent_per_s": sent_rate(answers),
        "deadline_s": args.deadline_s,
        "infer": settings.infer.model_dump(mode="json"),
        **summarize(answers),
        "by_routed_model": {
            model: summarize([a for a in answers if a.routed == model])
            for model in sorted({a.routed for a in answers})
        },
        "upstream_calls": stats["calls"],
        "upstream_calls_per_request": round(stats["calls"] / max(len(answers), 1), 3),
        "upstream_errors": {k: v for k, v in stats["errors"].items() if v},
        "fallbacks": grown(before[metrics.fallbacks], counter_values(metrics.fallbacks)),
        "breaker_transitions": grown(
            before[metrics.circuit_transitions], counter_values(metrics.circuit_transitions)
        ),
        "wall_s": round(wall_s, 1),
    }
    print_report(report)
    write_report(report, args.json)
    return 0


def print_report(report: dict[str, Any]) -> None:
    latency = [report[f"latency_{p}_ms"] for p in ("p50", "p99", "max")]
    rows: list[tuple[str, Any]] = [
        ("requests", f"{report['requests']} at {report['sent_per_s']}/s"),
        ("answered in time", f"{report['answered_in_time']:.2%} (target 99.9 %)"),
        ("  in full (not degraded)", f"{report['answered_in_full_in_time']:.2%}"),
        *((f"  {name}", n) for name, n in report["outcomes"].items()),
        ("answered late", report["answered_late"]),
        ("latency p50 / p99 / max ms", " / ".join(str(v) for v in latency)),
        ("upstream calls per request", report["upstream_calls_per_request"]),
        ("upstream errors", report["upstream_errors"]),
        ("fallbacks", report["fallbacks"]),
        ("breaker transitions", report["breaker_transitions"] or "none"),
        ("wall time s", report["wall_s"]),
    ]
    for model, numbers in report["by_routed_model"].items():
        in_time, in_full = numbers["answered_in_time"], numbers["answered_in_full_in_time"]
        summary = f"{in_time:.2%} in time, {in_full:.2%} in full, by {numbers['answered_by']}"
        rows.append((f"routed to {model}", summary))
    print_rows(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--deadline-s", type=float, default=10.0, help="each request's deadline")
    parser.add_argument("--error-rate", type=float, default=0.30)
    parser.add_argument("--timeout-rate", type=float, default=0.05, help="calls that hang")
    parser.add_argument("--rate-limit-rate", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=30.0, help="how long a hung call hangs")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)

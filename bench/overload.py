"""`llmflow bench overload`: five times the sustainable load against one worker on Tansu
(or Apache Kafka, `--broker kafka`).

First the rate the pipeline sustains is searched (`bench.load.max_sustained_rate`) with no
rate limit; then the worker is restarted with its limits set from that rate (each tenant's
request bucket at `--limit-share` of it, `batch.max_queued`, `limits.shed_queued_ms`,
`limits.intake_pause_backlog_ms` and every request's deadline) and runs an unloaded
baseline and the overload. The bench's client throttles itself (`client.throttle_k`,
`--client-throttle-k`; `llmflow.throttle`). Every prompt is made unique, so every admitted
request costs a model call. The report counts who shed what (`rate_limited`, `overloaded`,
`timeout`; of `overloaded`, how many the client refused itself; preprocess's decisions
from the worker's /metrics), requests left without an answer (should be none), the
worker's resident memory over the overload (max and slope), the lowest scale the adaptive
rate limit fell to, and the admitted requests' p99 as a ratio of the unloaded p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.load import (
    LoadRun,
    Outcome,
    Send,
    SustainCriteria,
    WorkItem,
    WorkloadSpec,
    add_broker_argument,
    build_workload,
    max_sustained_rate,
    open_loop,
    outcome_of,
    percentile,
    summary_ms,
)
from llmflow.brokers import start_broker
from llmflow.client import CLIENT_THROTTLED, LLMFlowClient, new_request
from llmflow.reports import figure, print_rows, write_report
from llmflow.stack import Workers
from schemas.messages import GenerationParams, Status
from topology.settings import ClientSettings, Quota, RateLimit, Rates, Settings, load_settings

ADMITTED = {Status.OK.value, Status.CACHED.value, Status.MERGED.value}
SHED = ("error_rate_limited", "error_overloaded", "error_timeout")
PAGE = os.sysconf("SC_PAGE_SIZE")


def sender(client: LLMFlowClient, deadline_s: float, answer_wait_s: float) -> Send:
    """Each item as a request with a deadline; its id on the end of the prompt keeps the
    cache and merging out of the measurement."""

    async def send(item: WorkItem) -> Outcome:
        request = new_request(
            f"{item.prompt} [{item.id}]",
            item.tenant,
            params=GenerationParams(max_tokens=item.max_tokens),
            deadline=time.time() + deadline_s,
        )
        return outcome_of(await client.call(request, timeout=answer_wait_s))

    return send


def limited(
    settings: Settings,
    sustainable_rps: float,
    share: float,
    max_queued: int,
    shed_queued_ms: float | None,
    intake_pause_backlog_ms: float | None = None,
) -> Settings:
    """`settings` with every tenant's request bucket refilled at `share` of the sustainable
    rate (one second of it as burst), the batch stage's queue bounded at `max_queued`,
    requests that queued past `shed_queued_ms` for preprocess shed, and preprocess holding
    its intake while hops queue past `intake_pause_backlog_ms`."""
    rate = max(1.0, sustainable_rps * share)
    quota = Quota(tenant=Rates(requests=RateLimit(burst=rate, per_second=rate)), reserve=0.0)
    return settings.model_copy(
        update={
            "ratelimit": settings.ratelimit.model_copy(update={"default": quota, "tenants": {}}),
            "batch": settings.batch.model_copy(update={"max_queued": max_queued}),
            "limits": settings.limits.model_copy(
                update={
                    "shed_queued_ms": shed_queued_ms,
                    "intake_pause_backlog_ms": intake_pause_backlog_ms,
                }
            ),
        }
    )


def unlimited(settings: Settings) -> Settings:
    """No rate limit and no shedding, so the search finds what the pipeline sustains."""
    return limited(settings, 1e9, 1.0, settings.batch.max_queued, None)


@dataclass(frozen=True)
class MemoryTrend:
    """Resident memory over a run: where it started, peaked and ended, and its slope."""

    start_mb: float
    max_mb: float
    end_mb: float
    slope_mb_per_min: float

    @classmethod
    def of(cls, samples: list[tuple[float, float]]) -> MemoryTrend:
        """From (seconds, megabytes) samples; the slope is a least-squares line's."""
        if not samples:
            return cls(0.0, 0.0, 0.0, 0.0)
        times = [t for t, _ in samples]
        values = [v for _, v in samples]
        mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
        spread = sum((t - mean_t) ** 2 for t in times)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread if spread else 0.0
        return cls(
            round(values[0], 1), round(max(values), 1), round(values[-1], 1), round(slope * 60, 2)
        )


def resident_mb(pids: list[int]) -> float:
    """The workers' resident memory together, read from /proc."""
    pages = sum(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) for pid in pids)
    return pages * PAGE / 2**20


def metric_samples(port: int) -> list[Any]:
    """Every sample a worker's /metrics shows now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def ratelimit_scale(port: int) -> float:
    """The worker's adaptive rate-limit scale (1.0 = the configured refill)."""
    for sample in metric_samples(port):
        if sample.name == "llmflow_ratelimit_scale":
            return float(sample.value)
    return 1.0


def preprocess_events(ports: list[int]) -> Counter[str]:
    """What preprocess decided so far, by outcome, over all workers: how many requests it
    shed for queueing too long (`queued_too_long`), held its intake (`intake_held`), ..."""
    counts: Counter[str] = Counter()
    for port in ports:
        for sample in metric_samples(port):
            if (
                sample.name == "llmflow_stage_events_total"
                and sample.labels.get("stage") == "preprocess"
            ):
                counts[sample.labels["outcome"]] += int(sample.value)
    return counts


@contextlib.asynccontextmanager
async def sampling(
    workers: Workers, every_s: float, memory: list[tuple[float, float]], scales: list[float]
) -> AsyncIterator[None]:
    """Every `every_s` while inside: append (seconds since start, the workers' resident MB)
    to `memory` and the lowest worker's rate-limit scale to `scales`."""
    began = time.monotonic()
    pids = [p.pid for p in workers.processes]

    async def sample() -> None:
        memory.append((time.monotonic() - began, resident_mb(pids)))
        found = [await asyncio.to_thread(ratelimit_scale, p) for p in workers.metrics_ports]
        scales.append(min(found))

    async def every() -> None:
        while True:
            await sample()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(every())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sample()


def shedding(run: LoadRun, unloaded_p99_ms: float) -> dict[str, Any]:
    """Who was turned away and how, and how the admitted fared against the unloaded run."""
    statuses = run.statuses()
    admitted_run = LoadRun(
        run.target_rps,
        [s for s in run.samples if s.outcome.status in ADMITTED and s.latency_ms is not None],
    )
    admitted = admitted_run.latencies_ms()
    p99 = percentile(admitted, 0.99)
    return {
        "requests": len(run.samples),
        "target_rps": round(run.target_rps, 1),
        "sent_rps": round(run.sent_rps, 1),
        "statuses": statuses,
        "admitted": len(admitted),
        "shed": {code: statuses.get(code, 0) for code in SHED},
        "refused_by_client": sum(1 for s in run.samples if s.outcome.reason == CLIENT_THROTTLED),
        "unanswered": sum(1 for s in run.samples if not s.answered),
        "admitted_latency_ms": summary_ms(admitted),
        "admitted_stage_ms": admitted_run.stage_summaries_ms(),
        "client_loop_lag_ms": summary_ms(run.loop_lag_ms),
        "admitted_p99_over_unloaded_p99": round(p99 / unloaded_p99_ms, 2)
        if unloaded_p99_ms
        else None,
    }


def items(count: int, tenant: str, seed: int) -> list[WorkItem]:
    spec = WorkloadSpec(count, duplicate_share=0.0, near_duplicate_share=0.0, seed=seed)
    return [
        WorkItem(f"{tenant}-{i.id}", tenant, i.messages, i.max_tokens, i.kind)
        for i in build_workload(spec)
    ]


async def measure(
    settings: Settings, workers: Workers, args: argparse.Namespace, rps: float
) -> dict[str, Any]:
    """An unloaded run, then `args.factor` times `rps` with the worker's memory sampled."""
    answer_wait_s = args.deadline_s + 60.0
    async with warmed_client(settings) as client:
        send = sender(client, args.deadline_s, answer_wait_s)
        calm = items(int(args.unloaded_rps * args.duration_s), "calm", args.seed)
        unloaded = await open_loop(send, calm, args.unloaded_rps, args.seed, answer_wait_s)
        unloaded_p99 = percentile(unloaded.latencies_ms(), 0.99)
        rate = rps * args.factor
        flood = items(int(rate * args.duration_s), "flood", args.seed + 1)
        memory: list[tuple[float, float]] = []
        scales: list[float] = []
        before = await asyncio.to_thread(preprocess_events, workers.metrics_ports)
        async with sampling(workers, 0.5, memory, scales):
            overload = await open_loop(send, flood, rate, args.seed, answer_wait_s)
        after = await asyncio.to_thread(preprocess_events, workers.metrics_ports)
    return {
        "unloaded": {
            "rps": args.unloaded_rps,
            "statuses": unloaded.statuses(),
            "latency_ms": summary_ms(unloaded.latencies_ms()),
            "stage_ms": unloaded.stage_summaries_ms(),
            "client_loop_lag_ms": summary_ms(unloaded.loop_lag_ms),
        },
        "overload": shedding(overload, unloaded_p99),
        "preprocess_events": dict(sorted((after - before).items())),
        "worker_rss_mb": MemoryTrend.of(memory).__dict__,
        "rss_samples": len(memory),
        "rss_mb_over_time": [[round(s, 1), round(mb, 1)] for s, mb in memory],
        "ratelimit_scale_min": round(min(scales), 3),
    }


@contextlib.asynccontextmanager
async def warmed_client(settings: Settings) -> AsyncIterator[LLMFlowClient]:
    """A client whose first request (the worker's slow first one) has been answered."""
    async with LLMFlowClient(settings) as client:
        await client.call(new_request("warm-up", "warm-up"), timeout=180)
        yield client


async def search(settings: Settings, args: argparse.Namespace) -> tuple[float, list[Any]]:
    """The highest rate sustained with no limits, and each trial's verdict."""
    async with warmed_client(settings) as client:
        send = sender(client, args.deadline_s, args.deadline_s + 60.0)

        async def run_at(rate: float) -> LoadRun:
            batch = items(int(rate * args.trial_s), f"search{rate:g}", args.seed)
            run = await open_loop(send, batch, rate, args.seed, args.deadline_s + 60)
            p99 = percentile(run.latencies_ms(), 0.99)
            print(
                f"trial {rate:g} req/s: sent {run.sent_rps:.1f}, answered "
                f"{run.answered_rps:.1f} req/s, p99 {p99:.0f} ms",
                flush=True,
            )
            return run

        # Poisson sends over a short trial vary by several percent, and the answer rate
        # counts the last answer's latency, hence the looser share than the default.
        criteria = SustainCriteria(min_rate_share=args.rate_share, max_p99_ms=args.max_p99_ms)
        found = await max_sustained_rate(
            run_at, criteria, args.start_rps, args.max_rps, refine_steps=2
        )
    trials = [
        {"rps": t.rate_rps, "sustained": t.sustained, "reasons": t.reasons} for t in found.trials
    ]
    return found.max_sustained_rps, trials


def run(args: argparse.Namespace) -> int:
    """Search on one stack, then measure on a fresh one started with the limits (a worker
    restarted on Tansu would first recover the search's Tables from their changelogs)."""
    # Imported here: llmflow.cli imports the benchmarks, and its embedded stack is reused.
    from llmflow.cli import _embedded

    base = load_settings(args.config)
    provider = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", "5"]

    def stack(settings: Settings) -> contextlib.AbstractContextManager[tuple[Settings, Workers]]:
        return _embedded(settings, 1, provider, start_broker(args.broker))

    started = time.monotonic()
    trials: list[Any] = []
    sustainable = args.sustainable_rps
    if not sustainable:
        with stack(unlimited(base)) as (settings, _workers):
            sustainable, trials = asyncio.run(search(settings, args))
    shed_settings = limited(
        base,
        sustainable,
        args.limit_share,
        args.max_queued,
        args.shed_queued_ms or None,
        args.intake_pause_backlog_ms or None,
    )
    throttle_k = args.client_throttle_k or None
    client = {**shed_settings.client.model_dump(), "throttle_k": throttle_k}
    shed_settings = shed_settings.model_copy(
        update={"client": ClientSettings.model_validate(client)}
    )
    with stack(shed_settings) as (settings, workers):
        measured = asyncio.run(measure(settings, workers, args, sustainable))
    limit = shed_settings.ratelimit.default.tenant.requests
    report = {
        "mode": f"one worker on {args.broker}, simulated provider, unique prompts",
        "sustainable_rps": sustainable,
        "search": trials,
        "factor": args.factor,
        "limits": {
            "tenant_requests_per_s": limit.per_second if limit else None,
            "batch_max_queued": args.max_queued,
            "shed_queued_ms": args.shed_queued_ms,
            "intake_pause_backlog_ms": args.intake_pause_backlog_ms,
            "deadline_s": args.deadline_s,
            "client_throttle_k": throttle_k,
        },
        **measured,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print_report(report)
    write_report(report, args.json, args.plot, lambda path: plot(report, path))
    return 0


def print_report(report: dict[str, Any]) -> None:
    overload, rss = report["overload"], report["worker_rss_mb"]
    rows: list[tuple[str, Any]] = [
        ("sustainable req/s", report["sustainable_rps"]),
        ("overload target / sent req/s", f"{overload['target_rps']} / {overload['sent_rps']}"),
        ("limits", report["limits"]),
        ("requests", overload["requests"]),
        ("statuses", overload["statuses"]),
        ("refused by the client (of error_overloaded)", overload["refused_by_client"]),
        ("preprocess events", report["preprocess_events"]),
        ("unanswered", overload["unanswered"]),
        ("unloaded p50 / p99 ms", _p50_p99(report["unloaded"]["latency_ms"])),
        ("admitted p50 / p99 ms", _p50_p99(overload["admitted_latency_ms"])),
        ("admitted p99 / unloaded p99", overload["admitted_p99_over_unloaded_p99"]),
        (
            "bench client loop lag p50 / p99 ms, unloaded | overload",
            f"{_p50_p99(report['unloaded']['client_loop_lag_ms'])} | "
            f"{_p50_p99(overload['client_loop_lag_ms'])}",
        ),
        *(
            (
                f"stage {stage} p50 / p99 ms, unloaded | admitted",
                f"{_p50_p99(calm)} | {_p50_p99(loaded)}",
            )
            for stage, loaded in overload["admitted_stage_ms"].items()
            if (calm := report["unloaded"]["stage_ms"].get(stage)) is not None
        ),
        (
            "worker RSS start / max / end MB",
            f"{rss['start_mb']} / {rss['max_mb']} / {rss['end_mb']}",
        ),
        ("worker RSS slope MB/min", rss["slope_mb_per_min"]),
        ("lowest adaptive rate-limit scale", report["ratelimit_scale_min"]),
        ("wall time s", report["wall_s"]),
    ]
    print_rows(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: the worker's resident memory over the overload. Right: each stage's p99, and
    the whole trip's, unloaded against admitted under the overload."""
    overload, unloaded = report["overload"], report["unloaded"]
    stages = [s for s in overload["admitted_stage_ms"] if s in unloaded["stage_ms"]]
    rows = {
        "end to end": (unloaded["latency_ms"], overload["admitted_latency_ms"]),
        **{s: (unloaded["stage_ms"][s], overload["admitted_stage_ms"][s]) for s in stages},
    }
    with figure(path, 1, 2, figsize=(12, 4.5)) as (memory, latency):
        seconds = [s for s, _ in report["rss_mb_over_time"]]
        memory.plot(seconds, [mb for _, mb in report["rss_mb_over_time"]], "-")
        memory.set(
            xlabel="seconds into the overload",
            ylabel="worker RSS MB",
            title=f"worker memory: {report['worker_rss_mb']['slope_mb_per_min']} MB/min",
        )
        memory.set_ylim(bottom=0)
        positions = range(len(rows))
        latency.barh([p + 0.2 for p in positions], [u["p99"] for u, _ in rows.values()], 0.4)
        latency.barh([p - 0.2 for p in positions], [a["p99"] for _, a in rows.values()], 0.4)
        latency.set_yticks(list(positions), list(rows))
        latency.invert_yaxis()
        latency.legend(["unloaded", "admitted"])
        ratio = overload["admitted_p99_over_unloaded_p99"]
        latency.set(
            xlabel="p99 ms",
            title=f"{overload['target_rps']} req/s offered: admitted p99 {ratio}x unloaded",
        )


def _p50_p99(summary: dict[str, float]) -> str:
    return f"{summary['p50']} / {summary['p99']}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument(
        "--plot", help="where to write a PNG of the worker's memory and the p99s by stage"
    )
    add_broker_argument(parser)
    parser.add_argument("--factor", type=float, default=5.0, help="times the sustainable rate")
    parser.add_argument("--duration-s", type=float, default=20.0, help="each measured run")
    parser.add_argument("--trial-s", type=float, default=15.0, help="each search trial")
    parser.add_argument("--start-rps", type=float, default=10.0)
    parser.add_argument("--max-rps", type=float, default=400.0)
    parser.add_argument("--max-p99-ms", type=float, default=2000.0, help="sustained if under")
    parser.add_argument(
        "--rate-share",
        type=float,
        default=0.85,
        help="sustained if sent and answered at this share",
    )
    parser.add_argument(
        "--sustainable-rps", type=float, help="skip the search and take this rate as sustainable"
    )
    parser.add_argument("--unloaded-rps", type=float, default=5.0)
    parser.add_argument(
        "--limit-share", type=float, default=0.8, help="tenant limit, share of sustainable"
    )
    parser.add_argument("--max-queued", type=int, default=64, help="batch.max_queued")
    parser.add_argument(
        "--shed-queued-ms",
        type=float,
        default=50.0,
        help="limits.shed_queued_ms: shed what waited longer for preprocess; 0: never",
    )
    parser.add_argument(
        "--intake-pause-backlog-ms",
        type=float,
        default=20.0,
        help="limits.intake_pause_backlog_ms: hold preprocess while hops queue longer; 0: never",
    )
    parser.add_argument(
        "--client-throttle-k",
        type=float,
        default=2.0,
        help="client.throttle_k: the client sends about k times what is accepted; 0: all",
    )
    parser.add_argument("--deadline-s", type=float, default=5.0, help="each request's deadline")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the provider's latency")
    parser.add_argument("--seed", type=int, default=0)

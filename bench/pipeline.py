"""`llmflow bench pipeline`: end-to-end latency, the pipeline's own overhead and the highest
rate it keeps up with, on the embedded stack `llmflow up` runs.

Tansu (or Apache Kafka, `--broker kafka`), Redis, the simulated provider (`--latency-ms`)
and `--workers` workers start as `llmflow up` starts them; a client sends a ShareGPT
workload (`bench.load`) at Poisson arrivals. Overhead is each answer's end-to-end latency,
measured by the sender, less its provider time (`LLMResponse.upstream_ms`: 0 for a cache
hit; unknown, and left out, for a merged follower, which waited on its leader's call). The
max sustained rate is the highest rate whose run keeps its send rate, answers 99 % of
requests, keeps answers at the send rate and keeps p99 under the provider latency plus
`--max-overhead-p99-ms` (`bench.load.SustainCriteria`); it is searched on a stack of its
own, since on Tansu the search would otherwise pay for the records of the run at `--rate`
(`bench.broker`). `--compare-fusion` runs it all with stage fusion off, by key and local
(`Settings.fusion`), each on fresh stacks, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, get_args

from bench.load import (
    LoadRun,
    Outcome,
    SustainCriteria,
    WorkItem,
    WorkloadSpec,
    add_broker_argument,
    build_workload,
    max_sustained_rate,
    open_loop,
    outcome_of,
    summary_ms,
)
from llmflow.brokers import start_broker
from llmflow.client import LLMFlowClient
from llmflow.reports import write_report
from llmflow.stack import fixed_latency
from schemas.messages import ChatMessage, GenerationParams, LLMRequest
from topology.settings import (
    AdaptiveLimit,
    Fusion,
    Quota,
    RateLimit,
    Rates,
    Settings,
    load_settings,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
WARM_UP_REQUESTS = 40
WARM_UP_RPS = 20.0


@dataclass(frozen=True)
class ProcessUsage:
    """CPU seconds (user + system) and resident memory of one process, from /proc."""

    cpu_s: float
    rss_bytes: int


def process_usage(pid: int) -> ProcessUsage:
    with open(f"/proc/{pid}/stat") as handle:
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = handle.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    utime, stime = int(fields[11]), int(fields[12])
    return ProcessUsage((utime + stime) / CLOCK_TICKS, resident_pages * PAGE_BYTES)


ROLES = (("tansu", "broker"), ("redis-server", "redis"), ("provider", "provider"))


def role_of(pid: int) -> str:
    """What a process of the stack is, from its command line."""
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        command = handle.read().decode(errors="replace")
    return next((role for word, role in ROLES if word in command), "other")


def stack_processes(workers: list[int], broker: int | None = None) -> dict[str, list[int]]:
    """This process (the bench client) and the processes it started, by role: the workers,
    the broker, Redis, the provider; what the pipeline costs beyond the workers. Apache
    Kafka's JVM is detached, so its pid is given."""
    children: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as handle:
            children += [int(pid) for pid in handle.read().split()]
    groups: dict[str, list[int]] = {"workers": list(workers), "client": [os.getpid()]}
    if broker is not None:
        groups["broker"] = [broker]
    for pid in children:
        if pid not in workers and pid != broker:
            groups.setdefault(role_of(pid), []).append(pid)
    return groups


class ResourceMeter:
    """Workers' CPU share and peak memory between `start` and `stop`, sampled every
    `interval_s` (the peak RSS needs samples; CPU time is cumulative)."""

    def __init__(self, pids: list[int], interval_s: float = 0.5) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak_rss: dict[int, int] = {}
        self._first: dict[int, ProcessUsage] = {}
        self._started = 0.0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> dict[int, ProcessUsage]:
        usage = {pid: process_usage(pid) for pid in self.pids}
        for pid, now in usage.items():
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), now.rss_bytes)
        return usage

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    def start(self) -> None:
        self._first = self._sample()
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run())

    def stop(self) -> dict[str, Any]:
        """Per process and in all: CPU seconds and % of one core, peak RSS in MiB."""
        if self._task is not None:
            self._task.cancel()
        last = self._sample()
        wall = max(time.monotonic() - self._started, 1e-9)
        cpu_s = {pid: last[pid].cpu_s - self._first[pid].cpu_s for pid in self.pids}
        cpu = {pid: 100.0 * cpu_s[pid] / wall for pid in self.pids}
        return {
            "cpu_s": round(sum(cpu_s.values()), 3),
            "cpu_percent_of_one_core": round(sum(cpu.values()), 1),
            "peak_rss_mib": round(sum(self.peak_rss.values()) / 2**20, 1),
            "processes": [
                {
                    "pid": pid,
                    "cpu_percent": round(cpu[pid], 1),
                    "peak_rss_mib": round(self.peak_rss[pid] / 2**20, 1),
                }
                for pid in self.pids
            ],
        }


def to_request(item: WorkItem) -> LLMRequest:
    return LLMRequest(
        id=item.id,
        tenant=item.tenant,
        messages=[ChatMessage.model_validate(m) for m in item.messages],
        params=GenerationParams(max_tokens=item.max_tokens),
    )


def run_summary(run: LoadRun) -> dict[str, Any]:
    """What one open-loop run measured, in the report's terms."""
    latency, overhead = summary_ms(run.latencies_ms()), summary_ms(run.overheads_ms())
    return {
        "rate_rps": run.target_rps,
        "sent_rps": round(run.sent_rps, 1),
        "answered_rps": round(run.answered_rps, 1),
        "requests": len(run.samples),
        "answered_share": round(run.answered_share, 4),
        "statuses": run.statuses(),
        "latency_ms": latency,
        "overhead_ms": overhead,
        "overhead_p50_ms": overhead["p50"],
        "overhead_p99_ms": overhead["p99"],
        "stage_ms": run.stage_summaries_ms(),
        "client_loop_lag_ms": summary_ms(run.loop_lag_ms),
    }


def cpu_per_request(resources: dict[str, dict[str, Any]], run: LoadRun) -> dict[str, Any]:
    """CPU milliseconds each answered request cost each part of the stack, and the rate
    this machine's cores could carry at that cost (which falls as the rate rises and the
    fixed cost of polling spreads: a bound on this run's rate, not the machine's)."""
    answered = max(1, sum(s.answered for s in run.samples))
    per_request = {role: 1e3 * r["cpu_s"] / answered for role, r in resources.items()}
    total = sum(per_request.values())
    return {
        "cpu_ms_per_request": {
            **{role: round(ms, 3) for role, ms in per_request.items()},
            "all": round(total, 3),
        },
        "cpu_bound_rps": round((os.cpu_count() or 1) * 1e3 / total, 1) if total else 0.0,
    }


def bench_settings(base: Settings, fusion: Fusion, embed: bool) -> Settings:
    """Limits far above any rate tried, so the bench measures the path, not the limiter."""
    limit = RateLimit(burst=1e6, per_second=1e6)
    ratelimit = base.ratelimit.model_copy(
        update={
            "default": Quota(tenant=Rates(requests=limit), reserve=0.0),
            "adaptive": AdaptiveLimit(enabled=False),
        }
    )
    return base.model_copy(
        update={
            "fusion": fusion,
            "ratelimit": ratelimit,
            "embedding": base.embedding.model_copy(update={"enabled": embed}),
            "semantic": base.semantic.model_copy(update={"enabled": embed}),
        }
    )


@contextlib.asynccontextmanager
async def driver(
    settings: Settings, args: argparse.Namespace
) -> AsyncIterator[Callable[[float, float, str], Awaitable[LoadRun]]]:
    """`run_at(rate, seconds, tag)`: the open loop at `rate` through a client of the
    running stack; every run uses its own tenants (`tag`), so none hits another's cache."""
    spec = WorkloadSpec(
        count=0,
        duplicate_share=args.duplicate_share,
        near_duplicate_share=args.near_duplicate_share,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    async with LLMFlowClient(settings) as client:

        async def send(item: WorkItem) -> Outcome:
            future = await client.submit(to_request(item))
            return outcome_of(await future)

        async def run_at(rate: float, seconds: float, tag: str) -> LoadRun:
            count = max(1, round(rate * seconds))
            items = build_workload(replace(spec, count=count, tenant_prefix=tag))
            return await open_loop(send, items, rate, args.seed, args.timeout_s)

        yield run_at


async def measure(
    settings: Settings, pids: list[int], args: argparse.Namespace, broker: int | None = None
) -> dict[str, Any]:
    """Warm up, then run the open loop at `args.rate` with the stack metered."""
    async with driver(settings, args) as run_at:
        warm = await run_at(WARM_UP_RPS, WARM_UP_REQUESTS / WARM_UP_RPS, "warm-up")
        meters = {
            role: ResourceMeter(group) for role, group in stack_processes(pids, broker).items()
        }
        for meter in meters.values():
            meter.start()
        main = await run_at(args.rate, args.duration, "main")
        resources = {role: meter.stop() for role, meter in meters.items()}
    return {
        **run_summary(main),
        "warm_up": {"requests": len(warm.samples), "statuses": warm.statuses()},
        "workers": resources["workers"],
        "stack": resources,
        **cpu_per_request(resources, main),
    }


async def search(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then search the max sustained rate."""
    async with driver(settings, args) as run_at:
        await run_at(WARM_UP_RPS, WARM_UP_REQUESTS / WARM_UP_RPS, "warm-up")
        criteria = SustainCriteria(max_p99_ms=args.latency_ms + args.max_overhead_p99_ms)
        trials = itertools.count()
        found = await max_sustained_rate(
            lambda rate: run_at(rate, args.search_duration, f"search-{next(trials)}"),
            criteria,
            args.search_start,
            args.search_max,
            args.search_steps,
        )
    return {
        "max_sustained_rps": found.max_sustained_rps,
        "search": [
            {
                "rate_rps": t.rate_rps,
                "sustained": t.sustained,
                "why_not": t.reasons,
                "answered_rps": round(t.run.answered_rps, 1),
                "latency_p99_ms": summary_ms(t.run.latencies_ms())["p99"],
            }
            for t in found.trials
        ],
    }


def run_one(
    base: Settings,
    fusion: Fusion,
    args: argparse.Namespace,
    worker_command: list[str] | None = None,
) -> dict[str, Any]:
    """The run at `args.rate` on one stack, the search on another (`worker_command`:
    another kind of worker, as `bench floor` measures)."""
    from llmflow.cli import _embedded  # here: the CLI imports this module

    settings = bench_settings(base, fusion, args.embed)
    provider_args = fixed_latency(args.latency_ms)
    broker = start_broker(args.broker)
    stack = _embedded(settings, args.workers, provider_args, broker, worker_command)
    with stack as (running, workers):
        pids = [p.pid for p in workers.processes]
        result = asyncio.run(measure(running, pids, args, broker.pid))
    fresh = _embedded(
        settings, args.workers, provider_args, start_broker(args.broker), worker_command
    )
    with fresh as (running, _workers):
        result |= asyncio.run(search(running, args))
    return {"fusion": fusion, **result}


COMPARED = (
    ("overhead p50 ms", "overhead_p50_ms"),
    ("overhead p99 ms", "overhead_p99_ms"),
    ("latency p50 ms", ("latency_ms", "p50")),
    ("latency p99 ms", ("latency_ms", "p99")),
    ("answered req/s", "answered_rps"),
    ("max sustained req/s", "max_sustained_rps"),
    ("worker CPU % of a core", ("workers", "cpu_percent_of_one_core")),
    ("worker peak RSS MiB", ("workers", "peak_rss_mib")),
    ("worker CPU ms/request", ("cpu_ms_per_request", "workers")),
    ("all CPU ms/request", ("cpu_ms_per_request", "all")),
    ("CPU-bound req/s", "cpu_bound_rps"),
    ("client loop lag p99 ms", ("client_loop_lag_ms", "p99")),
)


def value_at(run: dict[str, Any], key: str | tuple[str, str]) -> float:
    if isinstance(key, tuple):
        return float(run[key[0]][key[1]])
    return float(run[key])


def ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None


def comparison(
    runs: dict[str, dict[str, Any]],
) -> tuple[str, dict[str, dict[str, float | None]]]:
    """A table of each run's headline numbers and each later run's over the first's."""
    first, *later = list(runs)
    names = [first, *later]
    header = f"{'':24}" + "".join(f"{n:>12}" for n in names)
    ratios: dict[str, dict[str, float | None]] = {n: {} for n in later}
    over = {n: f"{n}/{first}" for n in later}
    widths = {n: max(14, len(over[n]) + 2) for n in later}
    lines = [header + "".join(f"{over[n]:>{widths[n]}}" for n in later)]
    for label, key in COMPARED:
        values = [value_at(runs[n], key) for n in names]
        line = f"{label:24}" + "".join(f"{v:>12.1f}" for v in values)
        name = key if isinstance(key, str) else "_".join(key)
        for n, value in zip(later, values[1:], strict=True):
            ratios[n][name] = ratio(value, values[0])
            line += f"{ratios[n][name] or 0:>{widths[n]}.3f}"
        lines.append(line)
    stages = sorted({s for r in runs.values() for s in r["stage_ms"]})
    for stage in stages:
        values = [runs[n]["stage_ms"].get(stage, {}).get("p50", 0.0) for n in names]
        lines.append(f"{'stage ' + stage + ' p50 ms':24}" + "".join(f"{v:>12.1f}" for v in values))
    return "\n".join(lines), ratios


def report_head(benchmark: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a report of runs by `add_load_arguments` begins with: what ran where."""
    return {
        "benchmark": benchmark,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "broker": args.broker,
        "provider_latency_ms": args.latency_ms,
        "duration_s": args.duration,
    }


def run(args: argparse.Namespace) -> int:
    base = load_settings(args.config)
    fusion: Fusion = args.fusion or base.fusion
    fusions: tuple[Fusion, ...] = get_args(Fusion) if args.compare_fusion else (fusion,)
    runs: dict[str, dict[str, Any]] = {f: run_one(base, f, args) for f in fusions}
    table, ratios = comparison(runs)
    print(table)
    primary = runs[fusion]
    report = {
        **report_head("pipeline", args),
        "workers": args.workers,
        "duplicate_share": args.duplicate_share,
        "near_duplicate_share": args.near_duplicate_share,
        "embedding": args.embed,
        "sustained_when": {
            "sent_rps_at_least": "95% of the rate",
            "answered_share_at_least": 0.99,
            "answered_rps_at_least": "95% of the rate",
            "latency_p99_ms_at_most": args.latency_ms + args.max_overhead_p99_ms,
        },
        "rate_rps": primary["rate_rps"],
        "overhead_p50_ms": primary["overhead_p50_ms"],
        "overhead_p99_ms": primary["overhead_p99_ms"],
        "max_sustained_rps": primary["max_sustained_rps"],
        "cpu_ms_per_request": primary["cpu_ms_per_request"],
        "cpu_bound_rps": primary["cpu_bound_rps"],
        "runs": runs,
        "fusion": fusion,
        "over_fusion_off": ratios,
    }
    write_report(report, args.json)
    return 0


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The stack, workload, run and search of `measure` and `search`."""
    parser.add_argument("--duration", type=float, default=30.0, help="seconds at --rate")
    add_broker_argument(parser)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the provider's")
    parser.add_argument("--duplicate-share", type=float, default=0.1)
    parser.add_argument("--near-duplicate-share", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--embed", action="store_true", help="embed: near-duplicates can merge")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="a request given up after")
    parser.add_argument("--search-start", type=float, default=250.0, help="first rate tried")
    parser.add_argument("--search-max", type=float, default=8000.0)
    parser.add_argument("--search-duration", type=float, default=10.0, help="seconds per trial")
    parser.add_argument("--search-steps", type=int, default=3, help="bisections after doubling")
    parser.add_argument("--max-overhead-p99-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="out/pipeline.json")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s")
    parser.add_argument("--workers", type=int, default=1)
    add_load_arguments(parser)
    parser.add_argument(
        "--fusion", choices=get_args(Fusion), help="the reported run's; default: the config's"
    )
    parser.add_argument(
        "--compare-fusion", action="store_true", help="fusion off, by key, then local"
    )

"""`llmflow bench peer`: llmflow beside the LiteLLM proxy, same workload, same provider.

Both systems are HTTP proxies in front of one simulated provider (fixed latency, no
jitter), driven by the same items through the same open-loop driver (`bench.load`) and the
same aiohttp sender, so the only difference is the proxy: llmflow's `llmflow serve` ingress
over the embedded pipeline (Tansu, or Apache Kafka with `--broker kafka`; Redis; faust
workers), or `litellm --config` from its own venv (`.venv-peer`: LiteLLM's dependencies
clash with faust-streaming's, so it never enters the runtime venv). Overhead is end-to-end
latency minus the provider's configured latency, measured at one fixed rate both keep up
with; throughput is the highest rate each sustains (`max_sustained_rate`). The headline
workload has no duplicates, because llmflow merges and caches them while LiteLLM (without
its cache) calls the model again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.faults import provider_stats
from bench.floor import echo_command
from bench.load import (
    LoadRun,
    Outcome,
    RateSearch,
    Send,
    SustainCriteria,
    WorkItem,
    WorkloadSpec,
    add_broker_argument,
    build_workload,
    max_sustained_rate,
    open_loop,
    percentile,
    summary_ms,
)
from llmflow.brokers import _ProcessServer, start_broker
from llmflow.reports import write_report
from llmflow.stack import fixed_latency
from topology.settings import RateLimit, Settings, load_settings, to_env

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".venv-peer"
PEER_REQUIREMENTS = Path(__file__).resolve().parent / "requirements-peer.txt"
MODEL = "sim-small"
MASTER_KEY = "sk-peer-bench"
# LiteLLM fetches its model price map from the internet at import unless told not to, and
# sends telemetry unless told not to; neither belongs in a measurement.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
}
UNLIMITED = RateLimit(burst=1e9, per_second=1e9)
# A Poisson run of n sends keeps its mean rate only to about 1/sqrt(n): fewer would fail the
# rate criteria by chance.
MIN_TRIAL_ITEMS = 100
# The table's columns: llmflow's floor (`--floor`) beside llmflow.
SYSTEMS = ("direct", "llmflow", "floor", "litellm")
WARM_UP_ITEMS = 20


def litellm_config(provider_url: str, models: Sequence[str], master_key: str) -> dict[str, Any]:
    """The proxy's config: each model passed through to the provider as an OpenAI-compatible
    deployment, no retries (llmflow's are not exercised either), no callbacks, no database
    (no `database_url`, spend logs off), so it does what a plain proxy does."""
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": provider_url,
                    "api_key": "none",
                },
            }
            for model in models
        ],
        "litellm_settings": {
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "num_retries": 0,
            "request_timeout": 120,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
        },
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
        },
        "router_settings": {"num_retries": 0},
    }


def requirements_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peer_venv_current(venv: Path, requirements: Path) -> bool:
    """Whether `venv` was installed from this very requirements file (its stamp holds the
    file's digest), like the Makefile's stamp for .venv-build."""
    stamp = venv / ".installed"
    return stamp.exists() and stamp.read_text().strip() == requirements_digest(requirements)


def ensure_peer_venv(venv: Path = PEER_VENV, requirements: Path = PEER_REQUIREMENTS) -> Path:
    """Create or update the peer's venv; pip prints its own progress. Returns `litellm`."""
    if not peer_venv_current(venv, requirements):
        print(f"installing {requirements.name} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "install", "-r", str(requirements)], check=True)
        (venv / ".installed").write_text(requirements_digest(requirements) + "\n")
    return venv / "bin" / "litellm"


def _with_env(env: dict[str, str], command: list[str]) -> list[str]:
    """`env` sets the child's variables: `_ProcessServer` starts children with ours."""
    return ["env", *(f"{name}={value}" for name, value in env.items()), *command]


class LiteLLMProxy(_ProcessServer):
    """`litellm --config` with `workers` uvicorn workers, as a child process."""

    name = "litellm"

    def __init__(self, litellm: Path, config: dict[str, Any], workers: int) -> None:
        super().__init__(start_timeout=180.0)
        self.litellm = litellm
        self.config = config
        self.workers = workers

    def _command(self, port: int, workdir: Path) -> list[str]:
        config = workdir / "config.yaml"
        config.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        command = [str(self.litellm), "--config", str(config), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--num_workers", str(self.workers)]
        return _with_env(LITELLM_ENV, [*command, "--telemetry", "False"])

    def _address(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/v1"


class IngressProcess(_ProcessServer):
    """`llmflow serve` with `settings`, as a child process like LiteLLM's proxy."""

    name = "ingress"

    def __init__(self, settings: Settings) -> None:
        super().__init__(start_timeout=120.0)
        self.settings = settings

    def _command(self, port: int, workdir: Path) -> list[str]:
        command = [sys.executable, "-m", "llmflow.cli", "serve", "--port", str(port)]
        return _with_env({**to_env(self.settings), "PYTHONUNBUFFERED": "1"}, command)

    def _address(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/v1"


@dataclass(frozen=True)
class Target:
    """Where one system takes chat completions, and the key each item's tenant uses."""

    name: str
    base_url: str
    key_for: Callable[[WorkItem], str]


def provider_ms_of(status: str, latency_ms: float) -> float | None:
    """The provider time behind an answer: the configured latency for a model call, none
    for a cache hit, unknown for a merged follower (it waited on another call)."""
    if status == "cached":
        return 0.0
    if status == "merged":
        return None
    return latency_ms


def http_sender(session: aiohttp.ClientSession, target: Target, latency_ms: float) -> Send:
    """POST each item to the target's /chat/completions as an OpenAI SDK would."""

    async def send(item: WorkItem) -> Outcome:
        body = {"model": MODEL, "messages": item.messages, "max_tokens": item.max_tokens}
        headers = {"Authorization": f"Bearer {target.key_for(item)}"}
        url = f"{target.base_url}/chat/completions"
        async with session.post(url, json=body, headers=headers) as reply:
            payload = await reply.read()
            if reply.status != 200:
                return Outcome(f"error_http_{reply.status}")
            status = reply.headers.get("x-llmflow-status", "ok")
        if not json.loads(payload)["choices"][0]["message"]["content"]:
            return Outcome("error_empty")
        return Outcome(status, provider_ms=provider_ms_of(status, latency_ms))

    return send


class ItemStream:
    """Hands out consecutive slices of one workload, so no request repeats an earlier
    trial's (llmflow would answer it from its cache); each system reads it from the start."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self.items = list(items)
        self.offset = 0

    def take(self, count: int) -> list[WorkItem]:
        if self.offset + count > len(self.items):
            raise ValueError(f"workload exhausted: {len(self.items)} items")
        chunk = self.items[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def restart(self) -> None:
        self.offset = 0


def items_for(rate_rps: float, trial_s: float) -> int:
    return max(MIN_TRIAL_ITEMS, math.ceil(rate_rps * trial_s))


def search_rates(start_rps: float, max_rps: float, refine_steps: int) -> list[float]:
    """The most rates `max_sustained_rate` may try: the doublings, then at most
    `refine_steps` bisections, each below the last doubling."""
    rates = [min(start_rps, max_rps)]
    while rates[-1] < max_rps:
        rates.append(min(rates[-1] * 2, max_rps))
    return rates + [rates[-1]] * refine_steps


def ratio(numerator: float, denominator: float) -> float | None:
    """`numerator / denominator` to three places; None when the denominator is not positive."""
    return round(numerator / denominator, 3) if denominator > 0 else None


def ratios(llmflow: dict[str, Any], litellm: dict[str, Any]) -> dict[str, float | None]:
    """llmflow ÷ LiteLLM: above 1 for throughput is llmflow ahead (target ≥ 6); below 1
    for overhead is llmflow adding less."""
    return {
        "throughput_ratio": ratio(llmflow["max_sustained_rps"], litellm["max_sustained_rps"]),
        "overhead_p99_ratio": ratio(llmflow["overhead_ms"]["p99"], litellm["overhead_ms"]["p99"]),
        "overhead_p50_ratio": ratio(llmflow["overhead_ms"]["p50"], litellm["overhead_ms"]["p50"]),
    }


def all_ratios(systems: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """`ratios` of llmflow and, when measured, of the floor (keys `floor_...`)."""
    found = ratios(systems["llmflow"], systems["litellm"])
    if "floor" in systems:
        floor = ratios(systems["floor"], systems["litellm"])
        found |= {f"floor_{key}": value for key, value in floor.items()}
    return found


def fixed_rate_summary(run: LoadRun) -> dict[str, Any]:
    return {
        "rate_rps": run.target_rps,
        "sent_rps": round(run.sent_rps, 1),
        "answered_share": round(run.answered_share, 4),
        "statuses": run.statuses(),
        "latency_ms": summary_ms(run.latencies_ms()),
        "overhead_ms": summary_ms(run.overheads_ms()),
    }


def search_summary(search: RateSearch) -> dict[str, Any]:
    return {
        "max_sustained_rps": search.max_sustained_rps,
        "trials": [
            {
                "rate_rps": round(trial.rate_rps, 1),
                "sustained": trial.sustained,
                "reasons": trial.reasons,
                "sent_rps": round(trial.run.sent_rps, 1),
                "answered_rps": round(trial.run.answered_rps, 1),
                "latency_p99_ms": round(percentile(trial.run.latencies_ms(), 0.99), 1),
                "statuses": trial.run.statuses(),
            }
            for trial in search.trials
        ],
    }


@dataclass(frozen=True)
class Plan:
    """What each system is put through, from the command line."""

    latency_ms: float
    rate_rps: float
    requests: int
    start_rps: float
    max_rps: float
    trial_s: float
    refine_steps: int
    criteria: SustainCriteria
    seed: int
    search: bool = True


async def measure(target: Target, stream: ItemStream, plan: Plan) -> dict[str, Any]:
    """A warm-up that must be answered in full, the fixed-rate run, then the max-rate search."""
    stream.restart()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        send = http_sender(session, target, plan.latency_ms)
        check = await open_loop(send, stream.take(WARM_UP_ITEMS), plan.rate_rps, progress=False)
        if check.answered_share < 1.0 or any(s.startswith("error") for s in check.statuses()):
            raise RuntimeError(f"{target.name} does not answer: {check.statuses()}")
        print(f"{target.name}: fixed rate {plan.rate_rps:g} req/s", flush=True)
        fixed = await open_loop(send, stream.take(plan.requests), plan.rate_rps, plan.seed)
        result = {"name": target.name, **fixed_rate_summary(fixed)}
        if not plan.search:
            return result

        async def run_at(rate: float) -> LoadRun:
            return await open_loop(send, stream.take(items_for(rate, plan.trial_s)), rate)

        print(f"{target.name}: max sustained rate search", flush=True)
        search = await max_sustained_rate(
            run_at, plan.criteria, plan.start_rps, plan.max_rps, plan.refine_steps
        )
        for trial in search.trials:
            verdict = "sustained" if trial.sustained else "; ".join(trial.reasons)
            print(f"{target.name}: {trial.rate_rps:.1f} req/s: {verdict}", flush=True)
        return {**result, **search_summary(search)}


def measure_all(
    target: Target, workloads: dict[str, list[WorkItem]], plan: Plan, provider_root: str
) -> dict[str, dict[str, Any]]:
    """`measure` over each workload, with the provider calls each caused."""
    results = {}
    for name, items in workloads.items():
        before = provider_stats(provider_root)["calls"]
        result = asyncio.run(measure(target, ItemStream(items), plan))
        results[name] = {
            **result,
            "provider_calls": provider_stats(provider_root)["calls"] - before,
        }
    return results


def bench_settings(base: Settings, tenants: Sequence[str]) -> tuple[Settings, dict[str, str]]:
    """The pipeline's settings for the bench: one API key per tenant of the workload, and
    rate limits out of the way (LiteLLM is given none either). Returns the keys too."""
    keys = {f"sk-{tenant}": tenant for tenant in tenants}
    ingress = base.ingress.model_validate({**base.ingress.model_dump(), "api_keys": keys})
    limits = base.ratelimit.model_validate(
        {
            **base.ratelimit.model_dump(),
            "default": {"tenant": {"requests": UNLIMITED.model_dump()}},
            "tenants": {},
            "adaptive": {**base.ratelimit.adaptive.model_dump(), "enabled": False},
        }
    )
    return base.model_copy(update={"ingress": ingress, "ratelimit": limits}), keys


def workload(spec: WorkloadSpec, plan: Plan, label: str) -> list[WorkItem]:
    """Enough items for the check, the fixed-rate run and the longest search; tenants
    carry `label`, so one workload's prompts are never cached answers for another's."""
    rates = search_rates(plan.start_rps, plan.max_rps, plan.refine_steps) if plan.search else []
    count = WARM_UP_ITEMS + plan.requests + sum(items_for(rate, plan.trial_s) for rate in rates)
    items = build_workload(replace(spec, count=count))
    return [
        replace(item, id=f"peer-{label}-{index}", tenant=f"{item.tenant}-{label}")
        for index, item in enumerate(items)
    ]


def through_ingress(
    name: str,
    running: Settings,
    workload: dict[str, list[WorkItem]],
    plan: Plan,
    tenant_key: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """`measure_all` through `llmflow serve` in front of the `running` stack."""
    with IngressProcess(running) as ingress:
        assert ingress.address is not None
        target = Target(name, ingress.address, lambda item: tenant_key[item.tenant])
        return measure_all(target, workload, plan, running.provider_url.removesuffix("/v1"))


def run_systems(
    args: argparse.Namespace, plan: Plan, workloads: dict[str, list[WorkItem]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per workload, on a fresh stack: the provider alone, llmflow, then LiteLLM, each
    measured with the other stopped; with `args.floor`, then the floor on a stack of its
    own. Tansu's cost grows with every record it holds (`bench.broker`), so a workload
    measured after another on one broker would pay for the other's records."""
    from llmflow.cli import _embedded  # here: the CLI imports this module

    litellm = ensure_peer_venv()
    tenants = sorted({item.tenant for items in workloads.values() for item in items})
    settings, keys = bench_settings(load_settings(args.config), tenants)
    tenant_key = {tenant: key for key, tenant in keys.items()}
    provider_args = fixed_latency(plan.latency_ms)
    systems = [system for system in SYSTEMS if args.floor or system != "floor"]
    by_system: dict[str, dict[str, dict[str, Any]]] = {system: {} for system in systems}
    for name, items in workloads.items():
        workload = {name: items}
        broker = start_broker(args.broker)
        with _embedded(settings, args.workers, provider_args, broker) as (running, workers):
            url = running.provider_url
            root = url.removesuffix("/v1")
            direct = Target("direct", url, lambda _item: "none")
            by_system["direct"] |= measure_all(direct, workload, replace(plan, search=False), root)
            by_system["llmflow"] |= through_ingress("llmflow", running, workload, plan, tenant_key)
            workers.stop()
            config = litellm_config(url, [MODEL], MASTER_KEY)
            with LiteLLMProxy(litellm, config, args.litellm_workers) as proxy:
                assert proxy.address is not None
                target = Target("litellm", proxy.address, lambda _item: MASTER_KEY)
                by_system["litellm"] |= measure_all(target, workload, plan, root)
        if args.floor:
            broker = start_broker(args.broker)
            floor = _embedded(
                settings, args.workers, provider_args, broker, echo_command("faust-model")
            )
            with floor as (running, _workers):
                by_system["floor"] |= through_ingress("floor", running, workload, plan, tenant_key)
    return by_system


def run(args: argparse.Namespace) -> int:
    criteria = SustainCriteria(min_rate_share=args.min_rate_share, max_p99_ms=args.max_p99_ms)
    plan = Plan(
        latency_ms=args.provider_latency_ms,
        rate_rps=args.rate,
        requests=args.requests,
        start_rps=args.start_rps,
        max_rps=args.max_rps,
        trial_s=args.trial_s,
        refine_steps=args.refine_steps,
        criteria=criteria,
        seed=args.seed,
    )
    spec = WorkloadSpec(
        count=0,
        duplicate_share=0.0,
        near_duplicate_share=0.0,
        tenants=args.tenants,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    specs = {"unique": spec}
    if args.duplicate_share > 0:
        specs["duplicates"] = replace(spec, duplicate_share=args.duplicate_share)
    workloads = {name: workload(s, plan, name) for name, s in specs.items()}
    started = time.monotonic()
    by_system = run_systems(args, plan, workloads)
    report: dict[str, Any] = {
        "mode": "HTTP: the same aiohttp sender and open-loop driver against each proxy",
        "provider": {"latency_ms": plan.latency_ms, "latency_jitter_ms": 0.0},
        "processes": {
            "llmflow": f"llmflow serve + {args.workers} faust worker(s), {args.broker}, Redis",
            "litellm": f"litellm proxy, {args.litellm_workers} uvicorn worker(s), no database",
            "floor": f"llmflow serve + {args.workers} faust agent(s) that only call the model"
            " (bench.floor faust-model)",
        },
        "litellm_requirement": PEER_REQUIREMENTS.read_text().split()[-1],
        "criteria": {
            "min_rate_share": criteria.min_rate_share,
            "min_answered_share": criteria.min_answered_share,
            "max_p99_ms": criteria.max_p99_ms,
        },
        "trial_s": plan.trial_s,
        "workloads": {},
    }
    for name, s in specs.items():
        systems = {system: results[name] for system, results in by_system.items()}
        report["workloads"][name] = {
            "duplicate_share": s.duplicate_share,
            "tenants": s.tenants,
            "max_tokens": s.max_tokens,
            "items": len(workloads[name]),
            **systems,
            **all_ratios(systems),
        }
    report.update(all_ratios({system: runs["unique"] for system, runs in by_system.items()}))
    report["wall_s"] = round(time.monotonic() - started, 1)
    for name, numbers in report["workloads"].items():
        print_table(name, numbers)
    write_report(report, args.json)
    return 0


def systems_in(numbers: dict[str, Any]) -> list[str]:
    """The systems a workload's numbers hold, in the table's order."""
    return [name for name in SYSTEMS if name in numbers]


def table_rows(numbers: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Rows of the side-by-side table: one value per system (`SYSTEMS`, those measured)."""
    systems = [numbers[name] for name in systems_in(numbers)]

    def row(label: str, value: Callable[[dict[str, Any]], Any]) -> tuple[str, list[str]]:
        return label, [str(value(system)) for system in systems]

    return [
        row("max sustained req/s", lambda s: s.get("max_sustained_rps", "-")),
        row("fixed rate req/s (sent)", lambda s: f"{s['rate_rps']:g} ({s['sent_rps']})"),
        row("answered share", lambda s: s["answered_share"]),
        row(
            "latency p50 / p99 ms", lambda s: f"{s['latency_ms']['p50']} / {s['latency_ms']['p99']}"
        ),
        row(
            "overhead p50 / p99 ms",
            lambda s: f"{s['overhead_ms']['p50']} / {s['overhead_ms']['p99']}",
        ),
        row("provider calls", lambda s: s["provider_calls"]),
        row("statuses (fixed rate)", lambda s: s["statuses"]),
    ]


def print_table(name: str, numbers: dict[str, Any]) -> None:
    rows = [("", systems_in(numbers)), *table_rows(numbers)]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(rows[0][1]))]
    print(f"workload {name} (duplicate share {numbers['duplicate_share']})")
    for label, values in rows:
        cells = "  ".join(f"{value:>{width}}" for value, width in zip(values, widths, strict=True))
        print(f"{label:<{label_width}}  {cells}")
    for key, value in numbers.items():
        if key.endswith("_ratio"):
            print(f"{key:<{label_width}}  {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--provider-latency-ms", type=float, default=50.0)
    parser.add_argument("--rate", type=float, default=20.0, help="the fixed-rate run's req/s")
    parser.add_argument("--requests", type=int, default=200, help="in the fixed-rate run")
    parser.add_argument("--start-rps", type=float, default=10.0, help="the search's first rate")
    parser.add_argument("--max-rps", type=float, default=640.0, help="the search's cap")
    parser.add_argument("--trial-s", type=float, default=10.0, help="each search run's length")
    parser.add_argument("--refine-steps", type=int, default=3, help="bisections after doubling")
    parser.add_argument("--max-p99-ms", type=float, default=2000.0, help="a sustained run's bound")
    parser.add_argument(
        "--min-rate-share",
        type=float,
        default=0.9,
        help="sent and answered rates a sustained run keeps, as a share of its target",
    )
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--duplicate-share",
        type=float,
        default=0.0,
        help="also run a workload with this share of exact duplicates (the headline has none)",
    )
    parser.add_argument("--workers", type=int, default=1, help="llmflow's faust workers")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floor: `llmflow serve` in front of faust agents that only call"
        " the model (`bench floor`'s faust-model), the most a faust pipeline carries here",
    )
    add_broker_argument(parser)
    parser.add_argument(
        "--litellm-workers",
        type=int,
        default=2,
        help="LiteLLM's uvicorn workers: 2, as llmflow runs two Python processes per request"
        " (the ingress and one worker)",
    )
    parser.add_argument("--seed", type=int, default=0)

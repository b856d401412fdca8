"""`llmflow bench kill`: a steady stream of requests through real workers on Apache Kafka
while something is killed with SIGKILL mid-run: does every request still get its terminal
answer, how many come twice, and how long until the answers flow again.

`LoadRecord` keeps what the client saw (pure bookkeeping the unit tests drive directly);
`steady_load` sends at a fixed rate and calls `kill` once, the integration tests in
tests/integration/test_faults_kafka.py and this command share it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from tqdm import tqdm

from llmflow.admin import create_topics, read_partitions, wait_for_stable_group
from llmflow.brokers import KafkaBroker
from llmflow.client import LLMFlowClient, new_request
from llmflow.reports import print_rows, write_report
from llmflow.stack import SimulatedProvider, Workers
from schemas.messages import LLMResponse
from topology.settings import AdaptiveLimit, Quota, RateLimit, Rates, Settings, load_settings

WORKER_START_S = 180.0


@dataclass
class LoadRecord:
    """When each request went out and when its first answer came (monotonic seconds)."""

    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    killed_at: float | None = None
    duplicates: int = 0

    def answer(self, request_id: str, response: LLMResponse, at: float) -> None:
        if request_id not in self.answered:
            self.answered[request_id] = at
            reason = response.error.reason if response.error else None
            self.statuses[f"{response.status.value}{f'/{reason}' if reason else ''}"] += 1

    def first_answer(self, request_id: str, future: asyncio.Future[LLMResponse]) -> None:
        """A done callback: the answer arrived now."""
        self.answer(request_id, future.result(), time.monotonic())

    def unanswered(self) -> list[str]:
        return [rid for rid in self.sent if rid not in self.answered]

    def backlog_s(self) -> float | None:
        """From the kill until every request sent before it was answered: the dead worker's
        in-flight requests wait for the group to notice and hand their partitions over."""
        if self.killed_at is None:
            return None
        before = [r for r, at in self.sent.items() if at <= self.killed_at]
        if any(r not in self.answered for r in before):
            return None
        return max((self.answered[r] - self.killed_at for r in before), default=0.0)

    def longest_gap_s(self) -> float:
        """The longest wait between two answers after the kill (while requests kept going)."""
        if self.killed_at is None:
            return 0.0
        times = sorted([self.killed_at, *(t for t in self.answered.values() if t > self.killed_at)])
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def latency_s(self, share: float) -> float:
        ranked = sorted(self.answered[r] - self.sent[r] for r in self.answered)
        return ranked[min(len(ranked) - 1, int(share * len(ranked)))] if ranked else 0.0

    def summary(self) -> dict[str, Any]:
        backlog = self.backlog_s()
        return {
            "sent": len(self.sent),
            "answered": len(self.answered),
            "unanswered": len(self.unanswered()),
            "duplicates_dropped_by_client": self.duplicates,
            "statuses": dict(sorted(self.statuses.items())),
            "backlog_answered_s": None if backlog is None else round(backlog, 2),
            "longest_answer_gap_after_kill_s": round(self.longest_gap_s(), 2),
            "latency_p50_s": round(self.latency_s(0.5), 3),
            "latency_max_s": round(self.latency_s(1.0), 3),
        }


async def steady_load(
    client: LLMFlowClient,
    rate: float,
    duration_s: float,
    kill_after_s: float,
    kill: Callable[[], None],
    answer_s: float,
    label: str = "kill",
) -> LoadRecord:
    """Send `rate` distinct requests a second for `duration_s`, call `kill` after
    `kill_after_s`, then wait up to `answer_s` for every answer."""
    record = LoadRecord()
    duplicates_before = client.duplicates
    futures: list[asyncio.Future[LLMResponse]] = []
    total = int(rate * duration_s)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with tqdm(total=total, desc=f"{label}: sent", unit="req") as progress:
        for index in range(total):
            await asyncio.sleep(max(0.0, started + index / rate - loop.time()))
            if record.killed_at is None and loop.time() - started >= kill_after_s:
                kill()
                record.killed_at = time.monotonic()
            request = new_request(f"{label} {index} {uuid.uuid4()}", "faults")
            future = await client.submit(request)
            record.sent[request.id] = time.monotonic()
            future.add_done_callback(partial(record.first_answer, request.id))
            futures.append(future)
            progress.update()
    await asyncio.wait(futures, timeout=answer_s)
    record.duplicates = client.duplicates - duplicates_before
    return record


async def trail(settings: Settings, request_ids: list[str]) -> dict[str, list[str]]:
    """Where each of `request_ids` was seen: every topic (changelogs too) whose records
    carry the id, as `topic[partition]@offset`, in order. An unanswered request's trail
    ends where it was lost."""
    if not request_ids:
        return {}
    wanted = {rid.encode(): rid for rid in request_ids}
    partitions = [
        TopicPartition(spec.name, p)
        for spec in settings.all_topics()
        for p in range(spec.partitions)
    ]
    found: dict[str, list[str]] = {rid: [] for rid in request_ids}
    for record in await read_partitions(settings.bootstrap_servers, partitions):
        value = record.value or b""
        for marker, rid in wanted.items():
            if marker in value:
                found[rid].append(f"{record.topic}[{record.partition}]@{record.offset}")
    return found


def load_limits(settings: Settings, rate: float) -> Settings:
    """A default quota well above `rate`, so the run measures the kill, not the limiter:
    its burst holds the backlog of a minute's stall (the group notices a dead worker only
    after its session timeout, then the survivor gets the backlog at once)."""
    limit = RateLimit(burst=int(rate * 60), per_second=rate * 4)
    ratelimit = settings.ratelimit.model_copy(
        update={
            "default": Quota(tenant=Rates(requests=limit), reserve=0.0),
            "adaptive": AdaptiveLimit(target_s=3600.0),
        }
    )
    return settings.model_copy(update={"ratelimit": ratelimit})


async def measure(args: argparse.Namespace, settings: Settings, run_dir: Path) -> dict[str, Any]:
    await create_topics(settings)
    with Workers(settings, run_dir, 2) as workers:
        await wait_for_stable_group(settings, 2, WORKER_START_S)
        async with LLMFlowClient(settings) as client:
            await client.call(new_request(f"warm-up {uuid.uuid4()}"), WORKER_START_S)
            record = await steady_load(
                client,
                args.rate,
                args.duration_s,
                args.kill_after_s,
                workers.processes[0].kill,
                args.answer_s,
            )
    return {**record.summary(), "unanswered_trail": await trail(settings, record.unanswered())}


def run(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="llmflow-kill-"))
    provider = SimulatedProvider(run_dir / "provider", ["--latency-ms", str(args.latency_ms)])
    url = provider.start()
    try:
        with KafkaBroker() as broker:
            settings = load_limits(load_settings(args.config), args.rate).model_copy(
                update={
                    "bootstrap_servers": broker.bootstrap,
                    "provider_url": url,
                    "processing_guarantee": args.guarantee,
                    "session_timeout_s": args.session_timeout_s,
                }
            )
            summary = asyncio.run(measure(args, settings, run_dir))
    finally:
        provider.stop()
    report = {
        "mode": "two workers on single-node Apache Kafka, one SIGKILLed mid-run",
        "rate_per_s": args.rate,
        "duration_s": args.duration_s,
        "kill_after_s": args.kill_after_s,
        "processing_guarantee": args.guarantee,
        "session_timeout_s": args.session_timeout_s,
        **summary,
        "worker_logs": str(run_dir),
    }
    print_rows(report.items())
    write_report(report, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--kill-after-s", type=float, default=10.0)
    parser.add_argument("--answer-s", type=float, default=300.0, help="wait for answers")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the provider's")
    parser.add_argument(
        "--guarantee", choices=["at_least_once", "exactly_once"], default="at_least_once"
    )
    parser.add_argument(
        "--session-timeout-s", type=float, default=10.0, help="the workers' group session"
    )

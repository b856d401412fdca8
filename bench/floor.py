"""`llmflow bench floor`: what the parts under llmflow carry with nothing of llmflow's
between them, beside llmflow itself, so a rate target can be weighed against the parts.

Each worker reads `llm.requests` and answers every request at once, `ok` with no output,
on its reply topic: `aiokafka`, a bare aiokafka consumer and producer; `faust`, one faust
agent on the worker's own app and transport (`streams.app.Pipeline`, no stage attached);
`llmflow`, the real worker and the simulated provider (`--latency-ms`). The same client,
workload, broker, sustain criteria and meters as `bench pipeline` (whose `measure` and
`search` run here) measure each on fresh stacks: a run at `--rate` for the CPU each part
spends a request, then the max sustained rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.types import StreamT

from bench.pipeline import (
    add_load_arguments,
    comparison,
    measure,
    report_head,
    run_one,
    search,
)
from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.brokers import start_broker
from llmflow.reports import write_report
from llmflow.stack import Workers
from llmflow.worker import Worker
from schemas.messages import LLMRequest, LLMResponse, Status, dump
from streams.app import Pipeline
from topology.settings import Settings, load_settings

Echo = Literal["aiokafka", "faust"]
Kind = Literal["llmflow", "faust", "aiokafka"]
STACK_PARTS = ("workers", "client", "broker")


def echo_reply(raw: bytes) -> tuple[str | None, bytes, bytes]:
    """A request's reply topic (None: the responses topic), key and `ok` answer. A floor
    worker does what any worker must: parse the request and write its answer."""
    request = LLMRequest.model_validate_json(raw)
    response = LLMResponse(id=request.id, tenant=request.tenant, status=Status.OK, output="")
    return request.reply_topic, request.id.encode(), dump(response)


async def aiokafka_echo(settings: Settings) -> None:
    """Answers with faust's producer settings (acks all, no linger) and the worker's
    fetch wait, in the workers' consumer group."""
    consumer = AIOKafkaConsumer(
        settings.topics.requests.name,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.app_id,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=0
    )
    await producer.start()
    await consumer.start()
    try:
        async for message in consumer:
            if message.value is None:
                continue
            topic, key, value = echo_reply(message.value)
            await producer.send(topic or settings.topics.responses.name, value, key=key)
    finally:
        await consumer.stop()
        await producer.stop()


def faust_echo(settings: Settings) -> None:
    pipeline = Pipeline(settings)

    @pipeline.app.agent(pipeline.requests_topic, name="echo")
    async def echo(stream: StreamT[bytes]) -> None:
        async for raw in stream:
            topic, key, value = echo_reply(raw)
            await pipeline.reply_topic(topic).send(key=key, value=value)

    Worker(pipeline.app, loglevel="WARNING").execute_from_commandline()


@contextlib.contextmanager
def echo_stack(
    echo: Echo, settings: Settings, broker_kind: str
) -> Iterator[tuple[Settings, list[int], int | None]]:
    """A fresh broker and one `echo` worker in the workers' group: the settings to reach
    them, the worker's pid and the broker's."""
    run_dir = Path(tempfile.mkdtemp(prefix="llmflow-floor-"))
    with start_broker(broker_kind) as broker:
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap})
        asyncio.run(create_topics(settings))
        command = [sys.executable, "-m", "bench.floor", echo]
        with Workers(settings, run_dir, command=command) as workers:
            asyncio.run(wait_for_stable_group(settings, 1, timeout_s=180))
            print(f"bench floor: {echo} echo on {settings.bootstrap_servers}, logs in {run_dir}")
            yield settings, [p.pid for p in workers.processes], broker.pid


def run_kind(kind: Kind, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The run at `args.rate` on one stack, the search on another, as `bench pipeline`."""
    if kind == "llmflow":
        return run_one(settings, settings.fusion, args)
    with echo_stack(kind, settings, args.broker) as (running, pids, broker):
        result = asyncio.run(measure(running, pids, args, broker))
    with echo_stack(kind, settings, args.broker) as (running, _pids, _broker):
        return result | asyncio.run(search(running, args))


def share_rows(runs: dict[str, dict[str, Any]]) -> str:
    """Each part's CPU, in % of one core, during the run at the rate asked."""
    lines = []
    for part in STACK_PARTS:
        values = [
            r["stack"].get(part, {}).get("cpu_percent_of_one_core", 0.0) for r in runs.values()
        ]
        lines.append(f"{part + ' CPU % of a core':24}" + "".join(f"{v:>12.1f}" for v in values))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    kinds: list[Kind] = args.kinds
    runs: dict[str, dict[str, Any]] = {kind: run_kind(kind, settings, args) for kind in kinds}
    table, ratios = comparison(runs)
    print(table)
    print(share_rows(runs))
    report = {
        **report_head("floor", args),
        "rate_rps": args.rate,
        "max_sustained_rps": {k: r["max_sustained_rps"] for k, r in runs.items()},
        "cpu_ms_per_request": {k: r["cpu_ms_per_request"] for k, r in runs.items()},
        "runs": runs,
        f"over_{kinds[0]}": ratios,
    }
    write_report(report, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="out/floor.json")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="open-loop req/s; one each worker keeps up with"
    )
    add_load_arguments(parser)
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=get_args(Kind),
        default=list(get_args(Kind)),
        help="the workers measured, the first the baseline of the ratios",
    )
    parser.set_defaults(workers=1, search_start=100.0)


def main(argv: list[str]) -> None:
    """A floor worker, as `echo_stack` starts it: `python -m bench.floor aiokafka|faust`."""
    if argv[:1] not in (["aiokafka"], ["faust"]):
        raise SystemExit("usage: python -m bench.floor aiokafka|faust")
    settings = load_settings()
    if argv[0] == "faust":
        faust_echo(settings)
    else:
        asyncio.run(aiokafka_echo(settings))


if __name__ == "__main__":
    main(sys.argv[1:])

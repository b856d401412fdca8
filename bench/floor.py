"""`llmflow bench floor`: what the parts under llmflow carry with nothing of llmflow's
between them, beside llmflow itself, so a rate target can be weighed against the parts.

Each worker reads `llm.requests` and answers every request on its reply topic:
`faust-model`, one faust agent on the worker's own app and transport
(`streams.app.Pipeline`, no stage attached) that calls the model for each request and
answers with its reply, what any LLM proxy must do; `faust`, the same agent answering
`ok` at once; `aiokafka`, that echo as a bare aiokafka consumer and producer; `llmflow`, the
real worker. The same client, workload, broker, simulated provider (`--latency-ms`),
sustain criteria and meters as `bench pipeline` (whose `run_one` runs here) measure each on
fresh stacks: a run at `--rate` for the CPU each part spends a request, then the max
sustained rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Literal, get_args

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.types import StreamT

from bench.pipeline import add_load_arguments, comparison, report_head, run_one
from llmflow.reports import write_report
from llmflow.worker import Worker
from schemas.messages import LLMRequest, LLMResponse, Status, dump
from streams.app import Pipeline
from topology.settings import Settings, load_settings

Echo = Literal["faust-model", "faust", "aiokafka"]
Kind = Literal["llmflow", "faust-model", "faust", "aiokafka"]
Reply = tuple[str | None, bytes, bytes]
STACK_PARTS = ("workers", "client", "broker", "provider")


def reply_of(request: LLMRequest, output: str, upstream_ms: float = 0.0) -> Reply:
    """A request's reply topic (None: the responses topic), key and `ok` answer."""
    response = LLMResponse(
        id=request.id,
        tenant=request.tenant,
        status=Status.OK,
        output=output,
        upstream_ms=upstream_ms,
    )
    return request.reply_topic, request.id.encode(), dump(response)


def echo_reply(raw: bytes) -> Reply:
    """The answer of a worker that does what any worker must: parse the request and write
    its answer."""
    return reply_of(LLMRequest.model_validate_json(raw), "ok")


async def model_reply(session: aiohttp.ClientSession, settings: Settings, raw: bytes) -> Reply:
    """The answer of a worker that also does what any LLM proxy must: call the model (the
    request's, else the router's small one) and answer with its reply."""
    request = LLMRequest.model_validate_json(raw)
    body = {
        "model": request.model or settings.route.small_model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.params.max_tokens,
    }
    started = time.perf_counter()
    async with session.post(f"{settings.provider_url}/chat/completions", json=body) as answer:
        answer.raise_for_status()
        completion = await answer.json()
    upstream_ms = (time.perf_counter() - started) * 1000
    return reply_of(request, completion["choices"][0]["message"]["content"], upstream_ms)


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


def faust_echo(settings: Settings, call_model: bool) -> None:
    """One faust agent answering each request: at once, or with `call_model` with the
    model's reply, each call a task of its own so that calls overlap, as llmflow's do
    (its event is acked before the answer: a floor, not a pipeline)."""
    pipeline = Pipeline(settings)
    calls: set[asyncio.Future[None]] = set()

    async def send(reply: Reply) -> None:
        topic, key, value = reply
        await pipeline.reply_topic(topic).send(key=key, value=value)

    async def answer_from_model(session: aiohttp.ClientSession, raw: bytes) -> None:
        await send(await model_reply(session, settings, raw))

    @pipeline.app.agent(pipeline.requests_topic, name="echo")
    async def echo(stream: StreamT[bytes]) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async for raw in stream:
                if not call_model:
                    await send(echo_reply(raw))
                    continue
                call = asyncio.ensure_future(answer_from_model(session, raw))
                calls.add(call)
                call.add_done_callback(calls.discard)

    Worker(pipeline.app, loglevel="WARNING").execute_from_commandline()


def echo_command(echo: Echo) -> list[str]:
    """How `Workers` starts an `echo` worker."""
    return [sys.executable, "-m", "bench.floor", echo]


def run_kind(kind: Kind, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The run at `args.rate` on one stack, the search on another, as `bench pipeline`."""
    command = None if kind == "llmflow" else echo_command(kind)
    return run_one(settings, settings.fusion, args, command)


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
    """A floor worker, as `echo_command` starts it: `python -m bench.floor ECHO`."""
    echoes = get_args(Echo)
    if len(argv) != 1 or argv[0] not in echoes:
        raise SystemExit(f"usage: python -m bench.floor {'|'.join(echoes)}")
    settings = load_settings()
    if argv[0] == "aiokafka":
        asyncio.run(aiokafka_echo(settings))
    else:
        faust_echo(settings, call_model=argv[0] == "faust-model")


if __name__ == "__main__":
    main(sys.argv[1:])

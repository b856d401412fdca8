"""`llmflow`: run the pipeline embedded, run a worker, submit a request, export schemas,
run benchmarks and evaluations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from bench import batching as bench_batching
from bench import broker as bench_broker
from bench import faults as bench_faults
from bench import floor as bench_floor
from bench import fuzz as bench_fuzz
from bench import kill as bench_kill
from bench import locality as bench_locality
from bench import overload as bench_overload
from bench import peer as bench_peer
from bench import pipeline as bench_pipeline
from evaluation import compare as eval_compare
from evaluation.pairs import evaluate as eval_pairs
from evaluation.replay import run as eval_replay
from evaluation.router import evaluate as eval_router
from inference.runtime import ModelLoadError
from llmflow import replay as replayer
from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.brokers import KafkaBroker, RedisServer, TansuBroker
from llmflow.client import LLMFlowClient, new_request, request_status
from llmflow.demo import run_demo
from llmflow.heap import freeze_startup_heap
from llmflow.stack import SimulatedProvider, Workers
from schemas.export import write_json_schemas
from schemas.messages import FeedbackEvent
from streams import metrics
from streams.forecast import run_scaler
from topology.settings import Settings, load_settings

T = TypeVar("T")


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "bootstrap", None):
        settings = settings.model_copy(update={"bootstrap_servers": args.bootstrap})
    if getattr(args, "in_namespace", None):
        settings = replayer.namespace_settings(settings, args.in_namespace)
    return settings


@contextlib.contextmanager
def _embedded(
    settings: Settings,
    workers: int,
    provider_args: list[str],
    broker: TansuBroker | KafkaBroker | None = None,
    worker_command: list[str] | None = None,
) -> Iterator[tuple[Settings, Workers]]:
    """A broker (Tansu unless given one), Redis (or the in-process cache), the simulated
    provider and the workers (`worker_command`: another kind of worker, `Workers`)."""
    run_dir = Path(tempfile.mkdtemp(prefix="llmflow-up-"))
    with contextlib.ExitStack() as stack:
        broker = broker or TansuBroker()
        stack.enter_context(broker)
        update: dict[str, object] = {"bootstrap_servers": broker.bootstrap}
        if RedisServer.available():
            update["redis_url"] = stack.enter_context(RedisServer()).url
        provider = SimulatedProvider(run_dir, provider_args)
        update["provider_url"] = provider.start()
        stack.callback(provider.stop)
        settings = settings.model_copy(update=update)
        asyncio.run(create_topics(settings))
        running = stack.enter_context(Workers(settings, run_dir, workers, command=worker_command))
        asyncio.run(wait_for_stable_group(settings, workers, timeout_s=180))
        redis = settings.redis_url or "in-process cache (no redis-server on PATH)"
        print(
            f"llmflow up: broker {settings.bootstrap_servers} ({type(broker).__name__}), "
            f"L2 cache {redis}, "
            f"provider {settings.provider_url}, {workers} worker(s), logs in {run_dir}",
            flush=True,
        )
        yield settings, running


async def _while_workers_live(
    settings: Settings, workers: Workers, work: Callable[[LLMFlowClient], Awaitable[T]]
) -> T | None:
    """Run `work` with a client; None at once if a worker exits, rather than waiting out
    the timeouts of requests no one will answer."""
    async with LLMFlowClient(settings) as client:
        task = asyncio.ensure_future(work(client))
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and not all(workers.alive()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()


def _worker_exited(workers: Workers) -> str:
    return f"a worker exited; its log is in {workers.run_dir}"


async def _demo(settings: Settings, count: int, workers: Workers) -> int:
    summary = await _while_workers_live(settings, workers, lambda c: run_demo(c, count))
    if summary is None:
        raise SystemExit(_worker_exited(workers))
    print(summary.table(), flush=True)
    return 0 if summary.missing == 0 else 1


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _wait_for_signal() -> None:
    asyncio.run(_until_signal())


def cmd_up(args: argparse.Namespace) -> int:
    provider_args = ["--latency-ms", str(args.provider_latency_ms)]
    with _embedded(_settings(args), args.workers, provider_args) as (settings, workers):
        code = 0
        if args.demo:
            code = asyncio.run(_demo(settings, args.demo, workers))
        if args.serve or not args.demo:
            print(
                f"serving; publish requests to {settings.topics.requests.name} on "
                f"{settings.bootstrap_servers}; Ctrl-C stops",
                flush=True,
            )
            _wait_for_signal()
        return code


def cmd_eval_replay(args: argparse.Namespace) -> int:
    """Replay ShareGPT through an embedded stack with the semantic layer on; a run cut
    short by a worker exiting still reports what came back."""
    workload = eval_replay.workload_from_args(args)
    settings = eval_replay.semantic_layer_on(_settings(args))
    outcome = eval_replay.Outcome()
    provider_args = ["--latency-ms", str(args.provider_latency_ms)]
    with _embedded(settings, args.workers, provider_args) as (settings, workers):
        done = asyncio.run(
            _while_workers_live(
                settings,
                workers,
                lambda c: eval_replay.replay(c, workload, args.rate, args.timeout, outcome),
            )
        )
        if done is None:
            outcome.aborted = _worker_exited(workers)
    return eval_replay.finish(args, settings, workload, outcome)


def cmd_worker(args: argparse.Namespace) -> int:
    from llmflow.worker import run_worker

    sys.argv = [sys.argv[0], "worker"]
    try:
        settings = _settings(args)
        if args.stages is not None:
            chosen = {**settings.model_dump(), "worker_stages": args.stages}
            settings = Settings.model_validate(chosen)
    except ValidationError as exc:
        print(f"llmflow worker: {exc}", file=sys.stderr)
        return 2
    try:
        run_worker(settings, args.loglevel)
    except ModelLoadError as exc:
        print(f"llmflow worker: {exc}", file=sys.stderr)
        return 2
    return 0


async def _submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    fields: dict[str, object] = {"stream": False}
    if args.model:
        fields["model"] = args.model
    request = new_request(args.prompt, args.tenant, **fields)
    async with LLMFlowClient(settings) as client:
        response = await client.call(request, timeout=args.timeout)
    print(response.model_dump_json(indent=2))
    return 0 if response.error is None else 2


def cmd_submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit(args))


async def _cancel(args: argparse.Namespace) -> int:
    async with LLMFlowClient(_settings(args)) as client:
        await client.cancel(args.id, args.reason)
    print(json.dumps({"cancelled": args.id}))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(args))


async def _feedback(args: argparse.Namespace) -> int:
    event = FeedbackEvent(
        request_id=args.id,
        tenant=args.tenant,
        correct=args.correct,
        rating=args.rating,
        comment=args.comment,
    )
    async with LLMFlowClient(_settings(args)) as client:
        await client.feedback(event)
    print(event.model_dump_json())
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    return asyncio.run(_feedback(args))


def cmd_status(args: argparse.Namespace) -> int:
    found = asyncio.run(request_status(_settings(args), args.id))
    if found is None:
        print(f"llmflow status: no record of {args.id!r} (unknown, or dropped)", file=sys.stderr)
        return 1
    print(found.model_dump_json(indent=2))
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from llmflow.warm import run

    settings = _settings(args)
    requests = args.requests or settings.topics.requests.name
    return run(settings, requests, args.responses or settings.topics.responses.name)


def cmd_scaler(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    asyncio.run(run_scaler(settings))
    return 0


async def _serve(settings: Settings) -> None:
    from llmflow.ingress import IngressServer

    async with IngressServer(settings) as server:
        print(
            f"llmflow serve: {server.base_url} (OpenAI-compatible), "
            f"{len(settings.ingress.api_keys)} API key(s), broker {settings.bootstrap_servers}; "
            "Ctrl-C stops",
            flush=True,
        )
        freeze_startup_heap()
        await _until_signal()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    update = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update={"ingress": settings.ingress.model_copy(update=update)})
    if not settings.ingress.api_keys:
        print(
            "llmflow serve: no API keys; set ingress.api_keys, e.g. "
            """LLMFLOW_INGRESS__API_KEYS='{"sk-mine": "my-tenant"}'""",
            file=sys.stderr,
        )
        return 2
    asyncio.run(_serve(settings))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    for path in write_json_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    created = asyncio.run(create_topics(_settings(args)))
    print(json.dumps({"created": created}))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="llmflow", description=__doc__)
    root.add_argument("--config", help="settings file (JSON); LLMFLOW_* env vars override it")
    sub = root.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the embedded pipeline (Tansu, Redis, provider, workers)")
    up.add_argument("--demo", type=int, default=0, metavar="N", help="send N requests, summarise")
    up.add_argument("--serve", action="store_true", help="keep running after the demo")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--provider-latency-ms", type=float, default=200.0)
    up.set_defaults(func=cmd_up)

    worker = sub.add_parser("worker", help="run one faust worker against the configured broker")
    worker.add_argument("--bootstrap")
    worker.add_argument(
        "--namespace", dest="in_namespace", help="run in a shadow namespace (llmflow replay)"
    )
    worker.add_argument("--loglevel", default="WARNING")
    worker.add_argument(
        "--stages",
        help="comma separated stages to run, e.g. dedup,cache,route,postprocess,warm "
        "(default: LLMFLOW_WORKER_STAGES, else every stage)",
    )
    worker.set_defaults(func=cmd_worker)

    submit = sub.add_parser("submit", help="send one request and print its response")
    submit.add_argument("prompt")
    submit.add_argument("--tenant", default="default")
    submit.add_argument("--model")
    submit.add_argument("--bootstrap")
    submit.add_argument("--timeout", type=float, default=60.0)
    submit.set_defaults(func=cmd_submit)

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP endpoint (/v1)")
    serve.add_argument("--host", help="default: ingress.host (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: ingress.port (8000)")
    serve.add_argument("--bootstrap")
    serve.set_defaults(func=cmd_serve)

    cancel = sub.add_parser("cancel", help="stop a request in flight: it is answered cancelled")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="cancelled by the caller")
    cancel.add_argument("--bootstrap")
    cancel.set_defaults(func=cmd_cancel)

    feedback = sub.add_parser("feedback", help="rate a request's answer: the router learns from it")
    feedback.add_argument("id")
    feedback.add_argument("--tenant", required=True, help="the tenant that sent the request")
    verdict = feedback.add_mutually_exclusive_group()
    verdict.add_argument("--correct", action="store_true", default=None)
    verdict.add_argument("--wrong", dest="correct", action="store_false")
    feedback.add_argument("--rating", type=float, help="-1 (bad) to 1 (good)")
    feedback.add_argument("--comment")
    feedback.add_argument("--bootstrap")
    feedback.set_defaults(func=cmd_feedback)

    status = sub.add_parser("status", help="a request's stages, model, retries and outcome")
    status.add_argument("id")
    status.add_argument("--bootstrap")
    status.set_defaults(func=cmd_status)

    warm = sub.add_parser("warm", help="fill the cache from the request and response topics")
    warm.add_argument("--requests", help="topic of the requests (default: the requests topic)")
    warm.add_argument("--responses", help="topic of their responses (default: responses topic)")
    warm.add_argument("--bootstrap")
    warm.set_defaults(func=cmd_warm)

    scaler = sub.add_parser(
        "scaler", help="forecast the request rate, export the replicas each group needs"
    )
    scaler.add_argument("--bootstrap")
    scaler.set_defaults(func=cmd_scaler)

    schema = sub.add_parser("schema", help="write the JSON Schemas of the wire messages")
    schema.add_argument("--out", default="schemas/json")
    schema.set_defaults(func=cmd_schema)

    topics = sub.add_parser("topics", help="manage topics")
    topics_sub = topics.add_subparsers(dest="action", required=True)
    create = topics_sub.add_parser("create", help="create the topology's topics")
    create.add_argument("--bootstrap")
    create.set_defaults(func=cmd_topics)

    bench = sub.add_parser("bench", help="benchmarks that print numbers and write JSON")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    batching = bench_sub.add_parser("batching", help="the batcher against offline batching")
    bench_batching.add_arguments(batching)
    batching.set_defaults(func=bench_batching.run)
    locality = bench_sub.add_parser("locality", help="LSH partition keys: split near-duplicates")
    bench_locality.add_arguments(locality)
    locality.set_defaults(func=bench_locality.run)
    faults = bench_sub.add_parser("faults", help="answers in time under provider faults")
    bench_faults.add_arguments(faults)
    faults.set_defaults(func=bench_faults.run)
    kill = bench_sub.add_parser("kill", help="SIGKILL a worker under load on Apache Kafka")
    bench_kill.add_arguments(kill)
    kill.set_defaults(func=bench_kill.run)
    fuzz = bench_sub.add_parser("fuzz", help="malformed messages against a running worker")
    bench_fuzz.add_arguments(fuzz)
    fuzz.set_defaults(func=bench_fuzz.run)
    overload = bench_sub.add_parser("overload", help="five times the sustainable load: shedding")
    bench_overload.add_arguments(overload)
    overload.set_defaults(func=bench_overload.run)
    peer = bench_sub.add_parser("peer", help="llmflow beside the LiteLLM proxy, same workload")
    bench_peer.add_arguments(peer)
    peer.set_defaults(func=bench_peer.run)
    broker = bench_sub.add_parser("broker", help="the broker's cost per record as its log grows")
    bench_broker.add_arguments(broker)
    broker.set_defaults(func=bench_broker.run)
    pipeline = bench_sub.add_parser("pipeline", help="overhead, max req/s, fusion off and on")
    bench_pipeline.add_arguments(pipeline)
    pipeline.set_defaults(func=bench_pipeline.run)
    floor = bench_sub.add_parser("floor", help="the parts under llmflow alone, beside it")
    bench_floor.add_arguments(floor)
    floor.set_defaults(func=bench_floor.run)

    pairs = sub.add_parser("eval-pairs", help="the semantic cache on labelled prompt pairs")
    eval_pairs.add_arguments(pairs)
    pairs.set_defaults(func=eval_pairs.run)

    replay = sub.add_parser("eval-replay", help="ShareGPT through the pipeline: what answered")
    eval_replay.add_arguments(replay)
    replay.set_defaults(func=cmd_eval_replay)

    replay_run = sub.add_parser("replay", help="resend a range of requests into a shadow namespace")
    replayer.add_arguments(replay_run)
    replay_run.set_defaults(func=replayer.run)

    compare = sub.add_parser("evaluate", help="two runs side by side: cost, latency, accuracy")
    eval_compare.add_arguments(compare)
    compare.set_defaults(func=eval_compare.run)

    router = sub.add_parser("eval-router", help="routing policies on zoo tasks: accuracy, cost")
    eval_router.add_arguments(router)
    router.set_defaults(func=eval_router.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

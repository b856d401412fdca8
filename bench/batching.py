"""`llmflow bench batching`: does the batch stage's batcher get what batching can give?

For the embedding model and a zoo decoder it measures, on one executor:
- offline throughput at each fixed batch size (the best is what batching can give),
- the batch stage's AdaptiveBatcher at saturation (arrivals at 1.5 times the best rate),
- light-load p50 latency (Poisson arrivals at a tenth of one-at-a-time capacity), each
  request run alone as it comes versus through the batcher,
and reports `saturation_vs_offline` (target ≥ 0.95) and `lightload_vs_unbatched`
(target ≤ 1.1). The batcher runs through `BatchScheduler`, the code the batch stage runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.batch import AdaptiveBatcher, BatchScheduler, ModelLimits
from inference.decoder import DecoderModel, SamplingParams
from inference.encoder import Encoder
from inference.runtime import Device, pick_providers
from llmflow.prompts import load_prompts
from llmflow.reports import write_report
from models.tasks import make_items
from schemas.messages import Priority
from topology.settings import BatchSettings, Settings, load_settings

DECODER = "zoo-large"
DECODER_MAX_TOKENS = 12
# Arrivals are handed over at most this often, as a Kafka consumer's fetch would.
FETCH_WAIT_S = 0.001
SATURATION = 1.5  # arrivals at this multiple of the best offline rate keep a backlog
LIGHT_LOAD = 0.1  # and at this share of one-at-a-time capacity leave the executor idle


@dataclass
class Workload:
    """A model as an executor: `run` processes one batch of items, synchronously."""

    name: str
    items: list[Any]
    run: Callable[[list[Any]], object]
    sizes: list[int]


def embedding_workload(settings: Settings, device: Device) -> Workload:
    encoder = Encoder(Path(settings.embedding.path), device, settings.engine.intra_op_threads, 64)
    texts = load_prompts(512, max_chars=1000)
    return Workload("embedding", texts, encoder.embed, [1, 2, 4, 8, 16, 32, 64])


def decoder_workload(settings: Settings, device: Device) -> Workload:
    spec = settings.model(DECODER)
    if spec is None or spec.path is None:
        raise SystemExit(f"the model registry has no local model {DECODER}")
    model = DecoderModel(Path(spec.path), device, settings.engine.intra_op_threads)
    prompts = [
        item.prompt
        for task in ("add", "reverse", "sort")
        for item in make_items(task, "hard", 64, seed=7, split="heldout")
    ]
    random.Random(0).shuffle(prompts)
    params = SamplingParams(max_tokens=DECODER_MAX_TOKENS)

    def run(batch: list[str]) -> object:
        return model.generate(batch, [params] * len(batch))

    return Workload("decoder", prompts, run, [1, 2, 4, 8, 16, 32])


def offline_throughput(
    workload: Workload, seconds_per_size: float, sizes: list[int]
) -> dict[int, float]:
    """Items per second with batches of each fixed size, the items cycled."""
    rates = {}
    for size in tqdm(sizes, desc=f"{workload.name} offline", unit="size", leave=False):
        done, started, start = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds_per_size or done == 0:
            batch = [workload.items[(start + i) % len(workload.items)] for i in range(size)]
            workload.run(batch)
            done += size
            start += size
        rates[size] = done / (time.perf_counter() - started)
    return rates


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    at, times = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        times.append(at)
    return times


async def _replay(arrivals: list[float], submit: Callable[[int, float], None]) -> float:
    """Call `submit(index, arrival_time)` at each planned arrival, on the loop's clock.

    Requests whose time came while the loop was busy, or within one fetch wait, go
    together, as a consumer's fetch hands them over; they keep their planned arrival time,
    so waiting counts as latency.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    index = 0
    with tqdm(total=len(arrivals), leave=False, unit="req") as progress:
        while index < len(arrivals):
            due = loop.time() - start
            first = index
            while index < len(arrivals) and arrivals[index] <= due:
                submit(index, start + arrivals[index])
                index += 1
            progress.update(index - first)
            if index < len(arrivals):
                wait = arrivals[index] - (loop.time() - start)
                await asyncio.sleep(max(FETCH_WAIT_S, wait))
    return start


async def unbatched_latencies(workload: Workload, arrivals: list[float]) -> list[float]:
    """Each request run alone as it arrives, one at a time, first come first served."""
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while len(latencies) < len(arrivals):
            index, arrived = await queue.get()
            await asyncio.to_thread(workload.run, [workload.items[index % len(workload.items)]])
            latencies.append(loop.time() - arrived)

    server = asyncio.create_task(serve())
    await _replay(arrivals, lambda i, at: queue.put_nowait((i, at)))
    await server
    return latencies


async def batched_latencies(
    workload: Workload, arrivals: list[float], max_size: int, settings: BatchSettings
) -> tuple[list[float], float]:
    """Latencies through the batch stage's scheduler on one executor, and items per second."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    finished = asyncio.Event()

    async def execute(_model: str, batch: list[tuple[int, float]]) -> bool:
        inputs = [workload.items[i % len(workload.items)] for i, _ in batch]
        try:
            await asyncio.to_thread(workload.run, inputs)
        finally:
            now = loop.time()
            latencies.extend(now - arrived for _, arrived in batch)
            if len(latencies) == len(arrivals):
                finished.set()
        return True

    async def never_expires(_item: tuple[int, float]) -> None:
        raise AssertionError("no deadlines are set in this benchmark")

    bounds = settings.model_copy(update={"max_size": max_size, "max_queued": len(arrivals)})
    batcher: AdaptiveBatcher[tuple[int, float]] = AdaptiveBatcher(
        bounds, lambda _m: ModelLimits(slots=1, max_size=max_size)
    )
    scheduler = BatchScheduler(batcher, execute, never_expires)
    runner = asyncio.create_task(scheduler.run())
    start = await _replay(
        arrivals, lambda i, at: scheduler.submit(workload.name, (i, at), Priority.NORMAL, None)
    )
    await finished.wait()
    elapsed = loop.time() - start
    runner.cancel()
    return latencies, len(arrivals) / elapsed


def p50_ms(latencies: list[float]) -> float:
    return round(statistics.median(latencies) * 1000.0, 3)


async def measure(
    workload: Workload,
    settings: BatchSettings,
    seconds_per_size: float,
    light_count: int,
    rounds: int,
) -> dict[str, Any]:
    """Sweep batch sizes offline, then `rounds` times run the offline baseline at the best
    size side by side with the batcher, so drift in the machine's speed hits both; the
    ratios reported are the medians over the rounds."""
    offline = offline_throughput(workload, seconds_per_size, workload.sizes)
    best_size = max(offline, key=lambda size: offline[size])
    light_rate = LIGHT_LOAD * offline[1]
    measured = []
    for round_index in range(rounds):
        baseline = offline_throughput(workload, seconds_per_size, [best_size])[best_size]
        count = int(baseline * SATURATION * seconds_per_size * 2) + 4 * best_size
        saturated = poisson_arrivals(SATURATION * baseline, count, round_index)
        print(f"{workload.name}: round {round_index + 1}, {count} requests at saturation")
        _, saturation_rate = await batched_latencies(workload, saturated, best_size, settings)
        light = poisson_arrivals(light_rate, light_count, 100 + round_index)
        print(f"{workload.name}: round {round_index + 1}, light load at {light_rate:.1f}/s")
        alone = p50_ms(await unbatched_latencies(workload, light))
        batched = p50_ms((await batched_latencies(workload, light, best_size, settings))[0])
        measured.append(
            {
                "offline_best_items_per_s": round(baseline, 2),
                "saturation_items_per_s": round(saturation_rate, 2),
                "saturation_vs_offline": round(saturation_rate / baseline, 3),
                "lightload_p50_ms_unbatched": alone,
                "lightload_p50_ms_batched": batched,
                "lightload_vs_unbatched": round(batched / alone, 3),
            }
        )
    return {
        "offline_items_per_s": {str(k): round(v, 2) for k, v in offline.items()},
        "best_batch_size": best_size,
        "lightload_rate_per_s": round(light_rate, 2),
        "saturation_vs_offline": statistics.median(r["saturation_vs_offline"] for r in measured),
        "lightload_vs_unbatched": statistics.median(r["lightload_vs_unbatched"] for r in measured),
        "rounds": measured,
    }


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.threads is not None:
        engine = settings.engine.model_copy(update={"intra_op_threads": args.threads})
        settings = settings.model_copy(update={"engine": engine})
    device: Device = args.device
    report: dict[str, Any] = {
        "device": device,
        "providers": pick_providers(device),
        "batch_bounds": settings.batch.model_dump(),
        "seconds_per_size": args.seconds,
        "intra_op_threads": settings.engine.intra_op_threads or "all cores",
    }
    for make in (embedding_workload, decoder_workload):
        workload = make(settings, device)
        report[workload.name] = asyncio.run(
            measure(workload, settings.batch, args.seconds, args.light_requests, args.rounds)
        )
        numbers = report[workload.name]
        print(
            f"{workload.name}: best batch {numbers['best_batch_size']}; "
            f"saturation_vs_offline {numbers['saturation_vs_offline']}, "
            f"lightload_vs_unbatched {numbers['lightload_vs_unbatched']} "
            f"(medians of {args.rounds} rounds)"
        )
        for index, result in enumerate(numbers["rounds"], 1):
            print(
                f"  round {index}: offline {result['offline_best_items_per_s']}/s, batcher "
                f"{result['saturation_items_per_s']}/s; light p50 "
                f"{result['lightload_p50_ms_batched']} vs {result['lightload_p50_ms_unbatched']} ms"
            )
    write_report(report, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seconds", type=float, default=2.0, help="per offline batch size")
    parser.add_argument("--light-requests", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side repetitions")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per session")

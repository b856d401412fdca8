"""`llmflow bench broker`: what one produce and its fetch cost the broker as its log grows.

Tansu 0.6's memory engine, the embedded default, pays for the records it holds on every
produce and fetch, and it frees none: it applies no `retention.ms` and closes the
connection on DeleteRecords. A run on the embedded stack therefore slows as it goes, and
a measurement taken after another (a second workload, a later search trial) pays for the
first one's records: a request leaves about 17 records behind. Apache Kafka's cost does
not grow that way. This bench shows both side by side: at each step, `--rounds` round
trips on one topic (a record sent and acknowledged, then fetched by a consumer waiting on
the topic's end), the broker's CPU per round from /proc and the round trip's p50; then
`--grow` more records are written before the next step. A first pass of `--rounds`, not
measured, warms both up.

The benches that start a stack (`bench pipeline`, `bench peer`, `bench overload`) take
`--broker`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from tqdm import tqdm

from bench.pipeline import process_usage
from llmflow.brokers import BROKERS, start_broker
from llmflow.reports import figure, write_report

TOPIC = "bench.broker"
PARTITIONS = 4
# About one envelope between two stages.
RECORD = b"x" * 1500
FETCH_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Step:
    """The rounds measured with `records` already in the topic."""

    records: int
    cpu_ms_per_round: float
    round_trip_p50_ms: float


def cpu_growth(steps: list[Step]) -> float | None:
    """The last step's broker CPU per round over the first's."""
    if len(steps) < 2 or steps[0].cpu_ms_per_round <= 0:
        return None
    return round(steps[-1].cpu_ms_per_round / steps[0].cpu_ms_per_round, 2)


async def _skip_to_end(consumer: AIOKafkaConsumer) -> None:
    """Past every record written so far; resolved now, since a lazy seek would skip the
    next round's record too when it is sent first."""
    await consumer.seek_to_end()
    for partition in consumer.assignment():
        await consumer.position(partition)


async def _round_trips(
    producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, rounds: int
) -> list[float]:
    """Seconds from each send to its record's fetch, one round at a time."""
    times = []
    for index in range(rounds):
        started = time.monotonic()
        await producer.send_and_wait(TOPIC, RECORD, partition=index % PARTITIONS)
        if not await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS):
            raise RuntimeError(f"a record sent was not fetched in {FETCH_TIMEOUT_MS} ms")
        times.append(time.monotonic() - started)
    return times


async def _grow(producer: AIOKafkaProducer, count: int) -> None:
    sent = [await producer.send(TOPIC, RECORD, partition=i % PARTITIONS) for i in range(count)]
    await asyncio.gather(*sent)


async def measure(
    bootstrap: str, broker_pid: int, rounds: int, grow: int, steps: int, label: str
) -> list[Step]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5)
    await producer.start()
    await consumer.start()
    consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
    results = []
    try:
        # A first pass, not measured: the JVM's JIT would otherwise bill Kafka's first step.
        await _skip_to_end(consumer)
        await _round_trips(producer, consumer, rounds)
        records = rounds
        for _ in tqdm(range(steps), desc=f"{label}: steps", unit="step"):
            await _skip_to_end(consumer)
            before = process_usage(broker_pid).cpu_s
            times = await _round_trips(producer, consumer, rounds)
            cpu_s = process_usage(broker_pid).cpu_s - before
            results.append(
                Step(
                    records=records,
                    cpu_ms_per_round=round(1000 * cpu_s / rounds, 3),
                    round_trip_p50_ms=round(1000 * statistics.median(times), 2),
                )
            )
            records += rounds
            await _grow(producer, grow)
            records += grow
    finally:
        await consumer.stop()
        await producer.stop()
    return results


def measure_broker(kind: str, args: argparse.Namespace) -> list[Step]:
    with start_broker(kind) as broker:
        assert broker.bootstrap is not None and broker.pid is not None
        return asyncio.run(
            measure(broker.bootstrap, broker.pid, args.rounds, args.grow, args.steps, kind)
        )


def plot(report: dict[str, Any], path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4)) as axes:
        for kind, result in report["brokers"].items():
            records = [s["records"] for s in result["steps"]]
            cpu = [s["cpu_ms_per_round"] for s in result["steps"]]
            axes[0].plot(records, cpu, "o-", label=kind)
            trip = [s["round_trip_p50_ms"] for s in result["steps"]]
            axes[1].plot(records, trip, "o-", label=kind)
        axes[0].set_ylabel("broker CPU ms per produce + fetch")
        axes[1].set_ylabel("round trip p50 ms")
        for axis in axes:
            axis.set_xlabel("records already in the topic")
            axis.set_ylim(bottom=0)
            axis.legend()


def run(args: argparse.Namespace) -> int:
    brokers = {kind: measure_broker(kind, args) for kind in args.brokers}
    report: dict[str, Any] = {
        "rounds": args.rounds,
        "grow": args.grow,
        "record_bytes": len(RECORD),
        "partitions": PARTITIONS,
        "brokers": {
            kind: {"steps": [asdict(s) for s in steps], "cpu_growth": cpu_growth(steps)}
            for kind, steps in brokers.items()
        },
    }
    print(f"{'broker':8} {'records':>9} {'cpu ms/round':>13} {'round trip p50 ms':>18}")
    for kind, steps in brokers.items():
        for step in steps:
            cpu, p50 = step.cpu_ms_per_round, step.round_trip_p50_ms
            print(f"{kind:8} {step.records:9d} {cpu:13.3f} {p50:18.2f}")
    for kind, result in report["brokers"].items():
        print(f"{kind}: CPU per round, last step over first: {result['cpu_growth']}")
    write_report(report, args.json, args.plot, lambda path: plot(report, path))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="out/broker.json")
    parser.add_argument("--plot", default="out/broker.png")
    parser.add_argument("--brokers", nargs="+", choices=BROKERS, default=list(BROKERS))
    parser.add_argument("--rounds", type=int, default=500, help="round trips per step")
    parser.add_argument("--grow", type=int, default=20000, help="records added between steps")
    parser.add_argument("--steps", type=int, default=6)

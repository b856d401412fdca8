"""`llmflow replay`: send a range of the live request topic again, into a shadow namespace.

The requests topic is the record of what agents asked (its `retention_ms` bounds how far
back a replay reaches). A replay reads a time or offset range of it and publishes each
request, at its original pace divided by a speed (or as fast as a rate cap allows), to the
request topic of a shadow namespace (`Settings.namespaced`) where workers with another
configuration answer. Each request keeps its id, so `llmflow evaluate` can join the two
runs; its reply topic becomes the shadow's response topic, so no live client ever sees a
shadow answer; `metadata.replayed_at` records when it was sent again (the shadow's
latencies start there, not at the original `created_at`), and a deadline moves by the same
amount, so it leaves the request the time it had.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from tqdm import tqdm

from llmflow.admin import create_topics, read_partitions
from schemas.messages import LLMRequest, dump
from topology.settings import Settings, load_settings

REPLAYED_AT = "replayed_at"


def namespace_settings(settings: Settings, namespace: str) -> Settings:
    """The settings of a named namespace (`live` is the un-prefixed pipeline itself)."""
    return settings if namespace == "live" else settings.namespaced(f"{namespace}.")


@dataclass(frozen=True)
class Window:
    """Which records of each partition to replay: offsets in [from_offset, to_offset) and
    record times (unix seconds) in [from_time, to_time); unset bounds are open."""

    from_offset: int | None = None
    to_offset: int | None = None
    from_time: float | None = None
    to_time: float | None = None

    def bounds(self, end: int, at_from: int | None, at_to: int | None) -> tuple[int, int | None]:
        """[start, stop) offsets in a partition whose end offset is `end`, given the first
        offsets whose time is at or after from_time and to_time (None: no record is that
        late); stop None reads to the end."""
        start = self.from_offset or 0
        if self.from_time is not None:
            start = max(start, end if at_from is None else at_from)
        stops = [self.to_offset, at_to if self.to_time is not None else None]
        stop = min((s for s in stops if s is not None), default=None)
        return start, None if stop is None else max(start, stop)

    def keeps(self, timestamp_ms: int) -> bool:
        """Producers stamp records, so times within a partition need not rise: the offset
        bounds find the range, and this drops the stragglers inside it. Records are
        stamped in whole milliseconds, so the bounds are compared as such."""
        after = self.from_time is None or timestamp_ms >= millis(self.from_time)
        return after and (self.to_time is None or timestamp_ms < millis(self.to_time))


def millis(at: float) -> int:
    """A unix time in seconds as Kafka stamps records: whole milliseconds."""
    return math.floor(at * 1000)


def pace(times_s: Sequence[float], speed: float, max_rate: float | None = None) -> list[float]:
    """Seconds after the replay starts at which each record (in time order) is sent: the
    original gaps divided by `speed` (infinite: no gaps), and never closer than
    1/`max_rate` apart when a rate cap is given."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, not {speed}")
    schedule: list[float] = []
    for at in times_s:
        due = 0.0 if math.isinf(speed) else (at - times_s[0]) / speed
        if max_rate is not None and schedule:
            due = max(due, schedule[-1] + 1.0 / max_rate)
        schedule.append(due)
    return schedule


def shadow_copy(request: LLMRequest, reply_topic: str, now: float) -> LLMRequest:
    """The request as the shadow gets it: same id and content, answered on `reply_topic`,
    stamped with when it was sent again, its deadline as far ahead of now as it was of its
    creation."""
    shift = now - request.created_at
    deadline = None if request.deadline is None else request.deadline + shift
    return request.model_copy(
        update={
            "reply_topic": reply_topic,
            "deadline": deadline,
            "metadata": {**request.metadata, REPLAYED_AT: f"{now:.6f}"},
        }
    )


@dataclass
class ReplayReport:
    read: int = 0
    replayed: int = 0
    invalid: int = 0
    span_s: float = 0.0
    wall_s: float = 0.0


async def select_records(
    bootstrap: str, topic: str, window: Window, progress: bool = True
) -> list[ConsumerRecord[bytes, bytes]]:
    """The records of `topic` inside `window`, in time order across partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            raise ValueError(f"topic {topic!r} does not exist on {bootstrap}")
        numbers = sorted(consumer.partitions_for_topic(topic) or ())
        partitions = [TopicPartition(topic, p) for p in numbers]
        ends = await consumer.end_offsets(partitions)
        at_from = await _offsets_at(consumer, partitions, window.from_time)
        at_to = await _offsets_at(consumer, partitions, window.to_time)
    finally:
        await consumer.stop()
    bounds = {tp: window.bounds(ends[tp], at_from[tp], at_to[tp]) for tp in partitions}
    total = sum(
        max(0, min(ends[tp], stop or ends[tp]) - start) for tp, (start, stop) in bounds.items()
    )
    with tqdm(total=total, desc="reading", unit="record", disable=not progress) as bar:
        records = await read_partitions(
            bootstrap,
            partitions,
            starts={tp: start for tp, (start, _) in bounds.items()},
            stops={tp: stop for tp, (_, stop) in bounds.items() if stop is not None},
            progress=bar.update,
        )
    kept = [r for r in records if window.keeps(r.timestamp)]
    return sorted(kept, key=lambda r: (r.timestamp, r.partition, r.offset))


async def _offsets_at(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], at: float | None
) -> dict[TopicPartition, int | None]:
    if at is None:
        return dict.fromkeys(partitions)
    found = await consumer.offsets_for_times({tp: millis(at) for tp in partitions})
    # Tansu answers "no record that late" with offset 0 and timestamp -1, Kafka with none.
    return {
        tp: None if hit is None or hit.timestamp < 0 else hit.offset for tp, hit in found.items()
    }


async def replay(
    live: Settings,
    shadow: Settings,
    window: Window,
    speed: float = 1.0,
    max_rate: float | None = None,
    progress: bool = True,
) -> ReplayReport:
    """Read `window` of the live request topic and send it into the shadow's."""
    await create_topics(shadow)
    records = await select_records(
        live.bootstrap_servers, live.topics.requests.name, window, progress
    )
    report = ReplayReport(read=len(records))
    requests: list[tuple[ConsumerRecord[bytes, bytes], LLMRequest]] = []
    for record in records:
        try:
            requests.append((record, LLMRequest.model_validate_json(record.value or b"")))
        except ValidationError:
            report.invalid += 1
    times = [record.timestamp / 1000.0 for record, _ in requests]
    schedule = pace(times, speed, max_rate)
    report.span_s = times[-1] - times[0] if times else 0.0
    producer = AIOKafkaProducer(bootstrap_servers=shadow.bootstrap_servers, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        with tqdm(total=len(requests), desc="replaying", unit="req", disable=not progress) as bar:
            for (record, request), due in zip(requests, schedule, strict=True):
                wait = started + due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                copy = shadow_copy(request, shadow.topics.responses.name, time.time())
                await producer.send(shadow.topics.requests.name, dump(copy), key=record.key)
                report.replayed += 1
                bar.update()
        await producer.flush()
    finally:
        await producer.stop()
    report.wall_s = time.monotonic() - started
    return report


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", required=True, help="the shadow namespace to feed")
    parser.add_argument("--source", default="live", help="the namespace whose requests to send")
    parser.add_argument("--from-time", type=parse_time, help="unix seconds or ISO 8601")
    parser.add_argument("--to-time", type=parse_time, help="exclusive")
    parser.add_argument("--from-offset", type=int, help="in every partition")
    parser.add_argument("--to-offset", type=int, help="exclusive, in every partition")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="times the original pace; inf: no gaps"
    )
    parser.add_argument("--max-rate", type=float, help="requests per second at most")
    parser.add_argument("--bootstrap")


def settings_of(args: argparse.Namespace) -> Settings:
    """The pipeline's settings for `replay` and `evaluate`: `--config`, then `--bootstrap`."""
    settings = load_settings(args.config)
    if args.bootstrap:
        settings = settings.model_copy(update={"bootstrap_servers": args.bootstrap})
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    live = namespace_settings(settings, args.source)
    shadow = namespace_settings(settings, args.namespace)
    window = Window(args.from_offset, args.to_offset, args.from_time, args.to_time)
    report = asyncio.run(replay(live, shadow, window, args.speed, args.max_rate))
    print(
        f"read {report.read} requests from {live.topics.requests.name}; replayed "
        f"{report.replayed} to {shadow.topics.requests.name} in {report.wall_s:.1f} s "
        f"(they spanned {report.span_s:.1f} s); {report.invalid} invalid skipped"
    )
    return 0

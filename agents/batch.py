"""Batch: per-model queues that close into batches sized and timed by the measured load.

Like NVIDIA Triton's dynamic batcher, a batch closes when it is full or when its wait runs
out; unlike a fixed window, both adapt. Per model the batcher keeps the arrival rate and a
line fitted to the measured batch latency (t = a + c·b, as BentoML does). The target size
is the smallest batch that keeps up with the arrivals, with headroom, within the size
bounds (or one, when one at a time keeps up); the wait is the time the arrivals take to
fill it, within the wait bounds. A free executor never idles for nothing: when the
arrivals expected before the wait runs out would not fill the batch, it closes at once,
so light load pays no batching delay.

High priority is taken before normal before low; a request whose deadline would pass
before its batch could finish is answered `timeout` instead of waiting; queues are bounded
and past the bound a request is answered `overloaded`.

Closed batches go to infer in this process (same key, no hop). Events are acked only once
their answers are sent on, so a worker crash redelivers them; faust commits offsets only
up to the oldest unacked event. Under fusion `local` the route stage of a worker that owns
the model's partition hands its requests over in process, holding the event read from
Kafka unacked until the answer is sent on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from faust import Stream
from faust.types import EventT, StreamT

from agents.cache import cached_answer
from agents.infer import InferenceRunner
from schemas.messages import Envelope, ErrorCode, Priority, Result, Status, StreamChunk, dump
from streams import metrics
from streams.app import LocalEvent, Pipeline, consumed
from streams.drivers.backends import open_backends
from streams.drivers.kafka_transport import on_behalf_of
from topology.settings import BatchSettings

STAGE = "batch"
log = logging.getLogger(__name__)
Item = TypeVar("Item")
PRIORITY_ORDER = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class QueueFull(Exception):
    pass


class DeadlineUnreachable(Exception):
    pass


class ArrivalRate:
    """Arrivals per second, decayed exponentially with time constant `tau_s`."""

    def __init__(self, tau_s: float = 1.0) -> None:
        self.tau_s = tau_s
        self._rate = 0.0
        self._at: float | None = None

    def _decayed(self, now: float) -> float:
        if self._at is None:
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._at) / self.tau_s)

    def arrive(self, now: float) -> None:
        self._rate = self._decayed(now) + 1.0 / self.tau_s
        self._at = now

    def per_second(self, now: float) -> float:
        return self._decayed(now)


class LatencyFit:
    """Batch latency as a line in batch size, t(b) = a + c·b, by recency-weighted least
    squares; before two sizes have been seen it assumes the per-batch cost dominates, and
    before any it assumes no cost, so nothing is refused on a guess."""

    def __init__(self, forget: float = 0.95) -> None:
        self.forget = forget
        self._n = self._sb = self._sbb = self._st = self._sbt = 0.0

    def record(self, size: int, seconds: float) -> None:
        f = self.forget
        self._n = f * self._n + 1.0
        self._sb = f * self._sb + size
        self._sbb = f * self._sbb + size * size
        self._st = f * self._st + seconds
        self._sbt = f * self._sbt + size * seconds

    def coefficients(self) -> tuple[float, float]:
        """(a, c): seconds per batch and seconds per item, both kept ≥ 0."""
        if self._n == 0.0:
            return 0.0, 0.0
        mean_b, mean_t = self._sb / self._n, self._st / self._n
        spread = self._sbb / self._n - mean_b * mean_b
        if spread < 1e-6 * max(1.0, mean_b * mean_b):
            return mean_t, 0.0
        c = max(0.0, (self._sbt / self._n - mean_b * mean_t) / spread)
        return max(0.0, mean_t - c * mean_b), c

    def predict(self, size: int) -> float:
        a, c = self.coefficients()
        return a + c * size


@dataclass(frozen=True)
class ModelLimits:
    """How many batches of a model may run at once, and how large one may be."""

    slots: int
    max_size: int


@dataclass
class Queued(Generic[Item]):
    item: Item
    arrived: float
    deadline: float | None


@dataclass
class ModelQueue(Generic[Item]):
    rate: ArrivalRate
    fit: LatencyFit
    by_priority: dict[Priority, deque[Queued[Item]]] = field(
        default_factory=lambda: {p: deque() for p in PRIORITY_ORDER}
    )
    batches_running: int = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_priority.values())

    def oldest_arrival(self) -> float:
        """Each priority's queue is in arrival order, so the oldest is one of their heads."""
        return min(q[0].arrived for q in self.by_priority.values() if q)

    def deadlines(self) -> Iterator[float]:
        return (e.deadline for q in self.by_priority.values() for e in q if e.deadline is not None)


class AdaptiveBatcher(Generic[Item]):
    """Per-model priority queues that close into batches; time is passed in, so tests and
    the benchmark drive it exactly as the batch stage does."""

    def __init__(self, settings: BatchSettings, limits: Callable[[str], ModelLimits]) -> None:
        self.settings = settings
        self.limits = limits
        self.queues: dict[str, ModelQueue[Item]] = {}
        self.items_running = 0

    @property
    def queued(self) -> int:
        """Requests held by this stage: waiting in a queue or in a running batch."""
        return sum(len(q) for q in self.queues.values()) + self.items_running

    def _queue(self, model: str) -> ModelQueue[Item]:
        queue = self.queues.get(model)
        if queue is None:
            queue = ModelQueue(ArrivalRate(self.settings.rate_window_s), LatencyFit())
            self.queues[model] = queue
        return queue

    def target_size(self, model: str, now: float) -> int:
        """The smallest batch that keeps up with the arrivals (b ≥ λ·t(b)), with headroom;
        one when requests one at a time keep up, so light load never waits to batch."""
        queue = self._queue(model)
        rate = queue.rate.per_second(now)
        a, c = queue.fit.coefficients()
        high = self.limits(model).max_size
        low = min(self.settings.min_size, high)
        if rate * c >= 1.0:
            return high
        need = rate * a / (1.0 - rate * c) * self.settings.headroom
        if need <= 1.0:
            return 1
        return max(low, min(high, math.ceil(need)))

    def wait_s(self, model: str, now: float) -> float:
        """How long the oldest request may wait: the arrivals' time to fill the target."""
        rate = self._queue(model).rate.per_second(now)
        fill = self.target_size(model, now) / rate if rate > 0 else math.inf
        low, high = self.settings.min_wait_ms / 1000.0, self.settings.max_wait_ms / 1000.0
        return max(low, min(high, fill))

    def add(
        self, model: str, item: Item, priority: Priority, deadline: float | None, now: float
    ) -> None:
        """Queue `item`, or raise QueueFull / DeadlineUnreachable so it is answered at once."""
        if self.queued >= self.settings.max_queued:
            raise QueueFull(f"{self.queued} requests already wait for a batch")
        queue = self._queue(model)
        queue.rate.arrive(now)
        if deadline is not None and deadline < now + queue.fit.predict(1):
            raise DeadlineUnreachable(
                f"the deadline is {max(0.0, deadline - now) * 1000:.0f} ms away; "
                f"a batch of {model} takes {queue.fit.predict(1) * 1000:.0f} ms"
            )
        queue.by_priority[priority].append(Queued(item, now, deadline))

    def slot_free(self, model: str) -> bool:
        return self._queue(model).batches_running < self.limits(model).slots

    def _ready(self, model: str, queue: ModelQueue[Item], now: float) -> bool:
        if not len(queue) or not self.slot_free(model):
            return False
        target = self.target_size(model, now)
        if len(queue) >= target:
            return True
        remaining = queue.oldest_arrival() + self.wait_s(model, now) - now
        if remaining <= 0:
            return True
        expected_arrivals = queue.rate.per_second(now) * remaining
        if len(queue) + expected_arrivals < target:
            return True
        finish = now + remaining + queue.fit.predict(target)
        return any(deadline < finish for deadline in queue.deadlines())

    def take_ready(self, now: float) -> list[tuple[str, list[Item]]]:
        """Close every batch that should go now, highest priority first, and count it as
        running until `done` is called for it."""
        batches = []
        for model, queue in self.queues.items():
            max_size = self.limits(model).max_size
            while self._ready(model, queue, now):
                items: list[Item] = []
                for priority in PRIORITY_ORDER:
                    pending = queue.by_priority[priority]
                    while pending and len(items) < max_size:
                        items.append(pending.popleft().item)
                queue.batches_running += 1
                self.items_running += len(items)
                batches.append((model, items))
        return batches

    def expire(self, now: float) -> list[Item]:
        """Remove and return the requests whose deadline would pass before a batch finished."""
        gone: list[Item] = []
        for queue in self.queues.values():
            finish = now + queue.fit.predict(1)
            for priority in PRIORITY_ORDER:
                kept: deque[Queued[Item]] = deque()
                for entry in queue.by_priority[priority]:
                    if entry.deadline is not None and entry.deadline < finish:
                        gone.append(entry.item)
                    else:
                        kept.append(entry)
                queue.by_priority[priority] = kept
        return gone

    def take_all(self) -> list[Item]:
        """Remove and return every request still waiting for a batch."""
        taken: list[Item] = []
        for queue in self.queues.values():
            for priority in PRIORITY_ORDER:
                taken.extend(entry.item for entry in queue.by_priority[priority])
                queue.by_priority[priority].clear()
        return taken

    def done(self, model: str, size: int, seconds: float | None) -> None:
        """A batch finished; `seconds` is None when its time says nothing of the model's
        speed (it timed out or failed), so one stall cannot lock out every deadline."""
        queue = self._queue(model)
        queue.batches_running -= 1
        self.items_running -= size
        if seconds is not None:
            queue.fit.record(size, seconds)

    def next_wakeup(self, now: float) -> float | None:
        """When a waiting batch's wait or a queued deadline next runs out; a model whose
        slots are all busy waits for a batch to finish instead, which wakes the loop."""
        times = []
        for model, queue in self.queues.items():
            if not len(queue):
                continue
            if self.slot_free(model):
                times.append(queue.oldest_arrival() + self.wait_s(model, now))
            earliest = min(queue.deadlines(), default=None)
            if earliest is not None:
                times.append(earliest - queue.fit.predict(1))
        return min(times) if times else None


class BatchScheduler(Generic[Item]):
    """Runs an AdaptiveBatcher on the event loop: closes batches, runs `execute` for each
    concurrently, and feeds the measured latency back. The batch stage and the benchmark
    both use it, so the benchmark measures the stage's own batching."""

    def __init__(
        self,
        batcher: AdaptiveBatcher[Item],
        execute: Callable[[str, list[Item]], Awaitable[bool]],
        expired: Callable[[Item], Awaitable[None]],
        failed: Callable[[list[Item], Exception], Awaitable[None]] | None = None,
    ) -> None:
        """`execute` runs one batch and says whether its time measures the model (False
        when it timed out or failed); `failed` answers the items of a batch whose `execute`
        raised, which would otherwise be left waiting."""
        self.batcher = batcher
        self.execute = execute
        self.expired = expired
        self.failed = failed
        self.running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def submit(self, model: str, item: Item, priority: Priority, deadline: float | None) -> None:
        """Queue `item`; `deadline` is on the loop's clock. Raises QueueFull or
        DeadlineUnreachable."""
        self.batcher.add(model, item, priority, deadline, self.now())
        if deadline is not None or self.batcher.slot_free(model):
            self._wake.set()  # else only a finishing batch can start the next, and wakes us

    async def _run_batch(self, model: str, items: list[Item]) -> None:
        started, measured = self.now(), False
        try:
            measured = await self.execute(model, items)
        except Exception as exc:
            log.exception("a batch of %d for %s failed", len(items), model)
            if self.failed is not None:
                try:
                    await self.failed(items, exc)
                except Exception:
                    log.exception("could not answer the requests of a failed batch")
        finally:
            self.batcher.done(model, len(items), self.now() - started if measured else None)
            self._start_ready()  # at once: the executor should not idle for a loop turn
            self._wake.set()

    def _start_ready(self) -> None:
        for model, items in self.batcher.take_ready(self.now()):
            task = asyncio.create_task(self._run_batch(model, items))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def run(self) -> None:
        """Close and start batches until cancelled. A failure to answer an expired request
        is logged and the loop goes on: if it stopped, every later request would hang."""
        while True:
            now = self.now()
            for item in self.batcher.expire(now):
                try:
                    await self.expired(item)
                except Exception:
                    log.exception("could not answer a request whose deadline passed")
            self._start_ready()
            wake_at = self.batcher.next_wakeup(now)
            timeout = None if wake_at is None else max(0.0005, wake_at - self.now())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def drain(self) -> None:
        """Wait for the batches already running."""
        while self.running:
            await asyncio.gather(*list(self.running), return_exceptions=True)


def report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the batch scheduler stopped", exc_info=task.exception())


def loop_deadline(envelope: Envelope, loop_now: float) -> float | None:
    """The request's unix deadline on the event loop's clock."""
    deadline = envelope.request.deadline
    return None if deadline is None else loop_now + (deadline - time.time())


Pending = tuple[EventT[bytes], Envelope]


class BatchStage:
    """The batch stage's requests, from admission until answered or handed on.

    Each event is acked once its request is answered or handed on; one whose answer could
    not even be sent stays unacked, so a restart delivers it again. A request a fusing
    stage hands over in process holds the event read from Kafka unacked the same way
    (`Pipeline.hold`), and is released on each of those exits. Batches run in their own
    tasks, so what they send is sent on behalf of its event (exactly-once puts it in that
    event's transaction).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        runner: InferenceRunner,
        batcher: AdaptiveBatcher[Pending],
        ack: Callable[[EventT[bytes]], Awaitable[Any]],
    ) -> None:
        """`ack` acks an event the stage's own stream read."""
        self.pipeline = pipeline
        self.runner = runner
        self.ack = ack
        self.scheduler = BatchScheduler(batcher, self.execute, self.expired, self.failed)
        self.handing_on: set[asyncio.Task[None]] = set()

    async def acknowledge(self, event: EventT[bytes]) -> None:
        if isinstance(event, LocalEvent):
            self.pipeline.release(event)
        else:
            await self.ack(event)

    async def settle(self, event: EventT[bytes], handing_on: Awaitable[None]) -> None:
        try:
            with on_behalf_of(consumed(event)):
                await handing_on
        except Exception:
            log.exception("could not answer or hand on offset %s", event.message.offset)
            return
        await self.acknowledge(event)

    async def hand_on(self, event: EventT[bytes], envelope: Envelope) -> None:
        try:
            with self.pipeline.handling(STAGE, event):
                await self.pipeline.send("postprocess", envelope)
        except Exception as exc:
            await self.pipeline.handle_crash(event, envelope, STAGE, exc)

    async def hand_on_all(self, items: list[Pending]) -> None:
        for event, envelope in items:
            self.pipeline.mark(envelope, "infer")
            await self.settle(event, self.hand_on(event, envelope))

    async def execute(self, model: str, items: list[Pending]) -> bool:
        """Run the model; the answers go on in their own task, so the model's slot is free
        for the next batch while they are sent."""
        metrics.batch_size.labels(model).observe(len(items))
        for event, envelope in items:
            with on_behalf_of(consumed(event)), self.pipeline.handling(STAGE, event):
                await self.pipeline.report(envelope, "infer")
        with metrics.batch_processing(model, len(items)):
            await self.runner.run([e for _, e in items])
        task = asyncio.create_task(self.hand_on_all(items))
        self.handing_on.add(task)
        task.add_done_callback(self.handing_on.discard)
        return any(e.status is Status.OK for _, e in items)

    async def failed(self, items: list[Pending], exc: Exception) -> None:
        """Answered and acked all the same: a held event would pin its partition's commits
        for as long as the worker runs."""
        for event, envelope in items:
            await self.settle(event, self.pipeline.handle_crash(event, envelope, STAGE, exc))

    async def expired(self, item: Pending) -> None:
        event, envelope = item
        message = "the deadline would pass before a batch could finish"
        await self.settle(
            event, self.pipeline.fail(envelope, ErrorCode.TIMEOUT, "deadline_exceeded", message)
        )

    async def admit(self, event: EventT[bytes], envelope: Envelope) -> None:
        pipeline = self.pipeline
        try:
            if await pipeline.screen(envelope, STAGE):
                await self.acknowledge(event)
                return
            priority = envelope.request.priority
            deadline = loop_deadline(envelope, self.scheduler.now())
            self.scheduler.submit(envelope.model or "", (event, envelope), priority, deadline)
        except QueueFull as exc:
            failing = pipeline.fail(envelope, ErrorCode.OVERLOADED, "batch_queue_full", str(exc))
            await self.settle(event, failing)
        except DeadlineUnreachable as exc:
            failing = pipeline.fail(envelope, ErrorCode.TIMEOUT, "deadline_exceeded", str(exc))
            await self.settle(event, failing)
        except Exception as exc:
            await self.settle(event, pipeline.handle_crash(event, envelope, STAGE, exc))

    async def hand_back(self) -> None:
        """Send the requests still waiting for a batch back to the stage's topic, each on
        behalf of its event, then let the event go: once the agent stops nothing would
        answer them, and their events would pin their partitions' commits until a
        rebalance read them again (a fused one's, until the worker restarts)."""
        for event, envelope in self.scheduler.batcher.take_all():
            await self.settle(event, self.pipeline.send(STAGE, envelope))

    async def admit_fused(self, event: EventT[bytes], envelope: Envelope) -> None:
        """A request route hands over in process: its event read from Kafka stays unacked
        until this request is answered or handed on."""
        self.pipeline.hold(event)
        await self.admit(event, envelope)


def attach(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    backends = open_backends(settings)

    async def send_chunk(chunk: StreamChunk) -> None:
        await pipeline.stream_topic.send(key=chunk.id.encode(), value=dump(chunk))

    async def cached(envelope: Envelope) -> Result | None:
        return await cached_answer(pipeline, envelope)

    runner = InferenceRunner(
        settings, backends, send_chunk, cached=cached, cancelled=pipeline.cancelled
    )

    async def close_backends(_app: object, *_args: object, **_kwargs: object) -> None:
        await backends.close()

    pipeline.app.on_before_shutdown.connect(cast(Any, close_backends))

    def limits(model: str) -> ModelLimits:
        spec = settings.model(model)
        if spec is None:
            return ModelLimits(slots=1, max_size=1)
        return ModelLimits(spec.max_batches_in_flight, spec.batch_limit(settings.batch.max_size))

    # Under exactly-once an answer goes out in the commit that passes its event's offset,
    # which a held event (`Pipeline.hold`) would never let pass.
    fuses = settings.processing_guarantee != "exactly_once"

    @pipeline.app.agent(pipeline.stage_topics[STAGE], name=STAGE)
    async def batch(stream: StreamT[bytes]) -> None:
        manual = cast(Stream[bytes], stream).noack()
        batcher: AdaptiveBatcher[Pending] = AdaptiveBatcher(settings.batch, limits)
        stage = BatchStage(pipeline, runner, batcher, manual.ack)
        admit_fused = stage.admit_fused  # one bound method: refuse_fused compares by identity
        flusher = asyncio.create_task(stage.scheduler.run())
        flusher.add_done_callback(report_stop)
        if fuses:
            pipeline.receive_fused(STAGE, admit_fused, screen=False)
        try:
            async for event, envelope in pipeline.envelopes(manual, STAGE):
                await stage.admit(event, envelope)
        finally:
            pipeline.refuse_fused(STAGE, admit_fused)
            flusher.cancel()
            await stage.hand_back()

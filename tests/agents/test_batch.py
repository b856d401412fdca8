"""AdaptiveBatcher: size and wait follow the load, priority order, deadlines, bounds;
BatchStage: every way out of the stage answers the request and lets its event go once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import faust
import pytest
from faust.events import Event
from faust.types import EventT, Message

from agents.batch import (
    AdaptiveBatcher,
    ArrivalRate,
    BatchScheduler,
    BatchStage,
    DeadlineUnreachable,
    LatencyFit,
    ModelLimits,
    Pending,
    QueueFull,
)
from agents.infer import InferenceRunner
from schemas.messages import Envelope, ErrorCode, LLMRequest, Priority, Status
from streams.app import LocalEvent, Pipeline, consumed
from topology.settings import BatchSettings, ModelSpec

NORMAL = Priority.NORMAL


def batcher(slots: int = 1, max_size: int = 16, **settings: float) -> AdaptiveBatcher[str]:
    values = {"min_size": 4, "max_size": 16, "min_wait_ms": 50, "max_wait_ms": 200, **settings}
    return AdaptiveBatcher(
        BatchSettings.model_validate(values), lambda _m: ModelLimits(slots, max_size)
    )


def teach(b: AdaptiveBatcher[str], model: str, a: float, c: float) -> None:
    """Give the model's latency fit measurements of t = a + c·size."""
    queue = b._queue(model)
    for size in (1, 4, 8, 16, 2, 12):
        queue.fit.record(size, a + c * size)


def test_latency_fit_recovers_the_line() -> None:
    fit = LatencyFit()
    assert fit.coefficients() == (0.0, 0.0)
    for size in (1, 2, 4, 8, 16, 3):
        fit.record(size, 0.010 + 0.002 * size)
    a, c = fit.coefficients()
    assert a == pytest.approx(0.010, abs=1e-9)
    assert c == pytest.approx(0.002, abs=1e-9)
    assert fit.predict(10) == pytest.approx(0.030)


def test_latency_fit_with_one_size_seen_charges_it_all_per_batch() -> None:
    fit = LatencyFit()
    fit.record(8, 0.04)
    fit.record(8, 0.06)
    a, c = fit.coefficients()
    assert c == 0.0
    assert a == pytest.approx(0.05, rel=0.05)


def test_arrival_rate_tracks_steady_arrivals() -> None:
    rate = ArrivalRate(tau_s=1.0)
    for i in range(1000):
        rate.arrive(i * 0.01)
    assert rate.per_second(9.99) == pytest.approx(100.0, rel=0.02)
    assert rate.per_second(19.99) < 0.01


def test_light_load_goes_at_once_without_waiting() -> None:
    b = batcher()
    teach(b, "m", a=0.010, c=0.001)
    b.add("m", "a", NORMAL, None, now=0.0)
    assert b.take_ready(now=0.0) == [("m", ["a"])]


def test_heavy_load_waits_to_fill_the_target_then_closes_full() -> None:
    b = batcher()
    now = 0.0
    for i in range(3000):  # 1,000 req/s for 3 s; each batch takes 5 ms + 0.2 ms a request
        now = i * 0.001
        b.add("m", f"w{i}", NORMAL, None, now)
        for model, items in b.take_ready(now):
            b.done(model, len(items), 0.005 + 0.0002 * len(items))
    target = b.target_size("m", now)
    rate = b.queues["m"].rate.per_second(now)
    assert 4 <= target < 16
    assert target >= rate * b.queues["m"].fit.predict(target)  # batches keep up
    queued = len(b.queues["m"])
    assert 0 < queued < target
    assert b.take_ready(now) == []
    for j in range(target - queued):
        b.add("m", f"x{j}", NORMAL, None, now + 0.0001 * (j + 1))
    ((_, items),) = b.take_ready(now + 0.0001 * target)
    assert len(items) == target


def test_target_size_stays_within_its_bounds() -> None:
    b = batcher()
    teach(b, "m", a=0.5, c=0.1)  # λ·c ≥ 1 at 10 req/s: the largest batch
    for i in range(50):
        b.queues["m"].rate.arrive(i * 0.01)
    assert b.target_size("m", 0.5) == 16
    busy = batcher()
    teach(busy, "m", a=0.010, c=0.0)
    for i in range(200):  # 200 req/s: needs batches of 2 with headroom, raised to 4
        busy.queues["m"].rate.arrive(i * 0.005)
    assert busy.target_size("m", 1.0) == 4
    idle = batcher()
    teach(idle, "m", a=0.001, c=0.0)
    assert idle.target_size("m", 0.0) == 1


def test_wait_stays_within_its_bounds() -> None:
    b = batcher()
    assert b.wait_s("m", 0.0) == pytest.approx(0.2)
    b._queue("m")
    for i in range(5000):
        b.queues["m"].rate.arrive(i * 0.0002)
    assert b.wait_s("m", 1.0) == pytest.approx(0.05)


def test_a_waiting_batch_closes_when_its_wait_runs_out() -> None:
    b = batcher()
    teach(b, "m", a=0.020, c=0.001)
    for i in range(100):
        b.queues["m"].rate.arrive(i * 0.001)
    b.add("m", "a", NORMAL, None, now=0.1)
    assert b.take_ready(now=0.1) == []
    wake = b.next_wakeup(now=0.1)
    assert wake is not None and 0.1 < wake <= 0.1 + 0.2
    assert b.take_ready(now=0.1 + 0.2) == [("m", ["a"])]


def test_high_priority_goes_before_normal_before_low() -> None:
    b = batcher(max_size=3)
    b.queues["m"] = b._queue("m")
    b.queues["m"].batches_running = 1  # executor busy while they queue
    b.add("m", "low", Priority.LOW, None, 0.0)
    b.add("m", "normal", NORMAL, None, 0.0)
    b.add("m", "high-1", Priority.HIGH, None, 0.0)
    b.add("m", "high-2", Priority.HIGH, None, 0.0)
    b.done("m", 0, 0.01)
    assert b.take_ready(1.0) == [("m", ["high-1", "high-2", "normal"])]
    b.done("m", 3, 0.01)
    assert b.take_ready(2.0) == [("m", ["low"])]


def test_an_unreachable_deadline_is_refused_at_once() -> None:
    b = batcher()
    teach(b, "m", a=0.100, c=0.0)
    with pytest.raises(DeadlineUnreachable, match="100 ms"):
        b.add("m", "late", NORMAL, deadline=0.05, now=0.0)
    b.add("m", "fine", NORMAL, deadline=0.5, now=0.0)


def test_requests_whose_deadline_would_pass_while_queued_expire() -> None:
    b = batcher(slots=1)
    teach(b, "m", a=0.100, c=0.0)
    b.queues["m"].batches_running = 1
    b.add("m", "soon", NORMAL, deadline=0.25, now=0.0)
    b.add("m", "later", NORMAL, deadline=5.0, now=0.0)
    assert b.expire(now=0.1) == []
    assert b.expire(now=0.2) == ["soon"]
    assert [e.item for q in b.queues["m"].by_priority.values() for e in q] == ["later"]


def test_queue_is_bounded_counting_running_batches() -> None:
    b = batcher(max_queued=3)
    b.add("m", "a", NORMAL, None, 0.0)
    assert b.take_ready(0.0) == [("m", ["a"])]
    b.add("m", "b", NORMAL, None, 0.0)
    b.add("other", "c", NORMAL, None, 0.0)
    with pytest.raises(QueueFull):
        b.add("m", "d", NORMAL, None, 0.0)
    b.done("m", 1, 0.01)
    b.add("m", "d", NORMAL, None, 0.0)


def test_no_batch_goes_while_every_slot_is_busy() -> None:
    b = batcher(slots=1)
    b.add("m", "a", NORMAL, None, 0.0)
    assert b.take_ready(0.0) == [("m", ["a"])]
    b.add("m", "b", NORMAL, None, 0.0)
    b.add("m", "c", NORMAL, None, 0.0)
    assert b.take_ready(1.0) == []
    b.done("m", 1, 0.02)
    assert b.take_ready(1.0) == [("m", ["b", "c"])]


def test_http_models_are_sent_one_request_per_batch() -> None:
    remote = ModelSpec(name="gpt", backend="openai")
    local = ModelSpec(name="zoo", backend="onnx", path="x")
    assert remote.batch_limit(16) == 1
    assert local.batch_limit(16) == 16
    assert ModelSpec(name="big", max_batch_size=8).batch_limit(16) == 8
    b = batcher(slots=10, max_size=1)
    for name in "abc":
        b.add("gpt", name, NORMAL, None, 0.0)
    assert b.take_ready(0.0) == [("gpt", ["a"]), ("gpt", ["b"]), ("gpt", ["c"])]


@contextlib.asynccontextmanager
async def running(scheduler: BatchScheduler[str]) -> AsyncIterator[asyncio.Task[None]]:
    """The scheduler's loop, running while inside; the batches it started are drained."""
    loop_task = asyncio.create_task(scheduler.run())
    try:
        yield loop_task
        await scheduler.drain()
    finally:
        loop_task.cancel()


async def test_scheduler_runs_batches_and_learns_their_latency() -> None:
    b = batcher(slots=1)
    ran: list[list[str]] = []
    expired: list[str] = []

    async def execute(_model: str, items: list[str]) -> bool:
        ran.append(items)
        await asyncio.sleep(0.02)
        return True

    async def on_expired(item: str) -> None:
        expired.append(item)

    scheduler = BatchScheduler(b, execute, on_expired)
    async with running(scheduler):
        scheduler.submit("m", "r0", NORMAL, None)
        await asyncio.sleep(0.005)
        for i in range(1, 20):
            scheduler.submit("m", f"r{i}", NORMAL, None)
        now = scheduler.now()
        scheduler.submit("m", "hopeless", NORMAL, now + 0.03)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(map(len, ran)) + len(expired) == 21:
                break
    assert sorted(x for batch in ran for x in batch) == sorted(f"r{i}" for i in range(20))
    assert expired == ["hopeless"]
    assert ran[0] == ["r0"]  # the first goes alone: nothing else had arrived
    assert max(map(len, ran)) > 1  # the rest queued behind it and went together
    assert 0.02 <= b.queues["m"].fit.predict(1) < 1.0  # sleeping 20 ms takes at least that
    assert b.queued == 0


def test_a_model_with_every_slot_busy_waits_for_a_batch_to_finish_not_a_timer() -> None:
    b = batcher(slots=1)
    b.add("m", "a", NORMAL, None, 0.0)
    assert b.take_ready(0.0) == [("m", ["a"])]
    b.add("m", "b", NORMAL, None, 0.0)
    assert b.next_wakeup(5.0) is None
    b.add("m", "c", NORMAL, deadline=9.0, now=0.0)
    assert b.next_wakeup(5.0) == pytest.approx(9.0)


async def test_the_scheduler_goes_on_when_answering_an_expired_request_fails() -> None:
    b = batcher(slots=1)
    ran: list[str] = []

    async def execute(_model: str, items: list[str]) -> bool:
        ran.extend(items)
        await asyncio.sleep(0.05)
        return True

    async def failing(_item: str) -> None:
        raise RuntimeError("the broker is gone")

    scheduler = BatchScheduler(b, execute, failing)
    async with running(scheduler) as loop_task:
        scheduler.submit("m", "first", NORMAL, None)
        await asyncio.sleep(0.01)
        scheduler.submit("m", "doomed", NORMAL, scheduler.now() + 0.02)
        await asyncio.sleep(0.1)
        scheduler.submit("m", "after", NORMAL, None)
        await asyncio.sleep(0.1)
    assert ran == ["first", "after"]
    assert not loop_task.done() or loop_task.cancelled()


def test_a_failed_batch_does_not_teach_the_latency_fit() -> None:
    b = batcher(slots=1)
    b.add("m", "a", NORMAL, None, 0.0)
    b.take_ready(0.0)
    b.done("m", 1, None)  # timed out after 30 s: not the model's speed
    assert b.queues["m"].fit.predict(1) == 0.0
    b.add("m", "b", NORMAL, deadline=1.0, now=0.0)  # still admitted
    assert b.queued == 1


async def test_the_requests_of_a_batch_that_raised_are_handed_to_failed() -> None:
    b = batcher(slots=1)
    ran: list[list[str]] = []
    answered: list[tuple[list[str], str]] = []

    async def execute(_model: str, items: list[str]) -> bool:
        ran.append(items)
        if items == ["broken"]:
            raise RuntimeError("the status topic is gone")
        return True

    async def failed(items: list[str], exc: Exception) -> None:
        answered.append((items, str(exc)))

    async def never_expires(_item: str) -> None:
        raise AssertionError("no deadlines here")

    scheduler = BatchScheduler(b, execute, never_expires, failed)
    async with running(scheduler):
        scheduler.submit("m", "broken", NORMAL, None)
        await asyncio.sleep(0.02)
        scheduler.submit("m", "after", NORMAL, None)
        await asyncio.sleep(0.02)
    assert answered == [(["broken"], "the status topic is gone")]
    assert ran == [["broken"], ["after"]]


class StagePipeline:
    """Stands in for the worker's Pipeline: what the batch stage did with each request,
    and how it held and released the events read from Kafka behind fused ones."""

    def __init__(
        self,
        screened: bool = False,
        screen_error: Exception | None = None,
        fail_error: Exception | None = None,
    ) -> None:
        self.screened = screened
        self.screen_error = screen_error
        self.fail_error = fail_error
        self.done: list[str] = []

    def hold(self, event: EventT[bytes]) -> None:
        consumed(event).message.incref()

    def release(self, event: EventT[bytes]) -> None:
        consumed(event).message.decref()
        self.done.append("released")

    async def screen(self, _envelope: Envelope, _stage: str) -> bool:
        if self.screen_error is not None:
            raise self.screen_error
        return self.screened

    async def fail(self, _envelope: Envelope, _code: ErrorCode, reason: str, _message: str) -> None:
        if self.fail_error is not None:
            raise self.fail_error
        self.done.append(f"failed {reason}")

    async def handle_crash(
        self, _event: EventT[bytes], _envelope: Envelope, _stage: str, exc: Exception
    ) -> None:
        self.done.append(f"crashed {exc}")

    async def send(self, stage: str, _envelope: Envelope) -> None:
        self.done.append(f"sent to {stage}")

    def mark(self, _envelope: Envelope, _stage: str) -> None:
        pass

    async def report(self, _envelope: Envelope, _stage: str) -> None:
        pass

    @contextlib.contextmanager
    def handling(self, _stage: str, _event: EventT[bytes]) -> Iterator[None]:
        yield


class Runner:
    """Stands in for the InferenceRunner: answers every request, or raises."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def run(self, envelopes: list[Envelope]) -> list[Envelope]:
        if self.error is not None:
            raise self.error
        for envelope in envelopes:
            envelope.status = Status.OK
        return envelopes


APP = faust.App("test-batch-stage", broker="memory://")
MODEL = "sim-small"


def stage_for(
    pipeline: StagePipeline, runner: Runner | None = None
) -> tuple[BatchStage, list[EventT[bytes]]]:
    """The stage, and the events its own stream's acks reached."""
    acked: list[EventT[bytes]] = []

    async def ack(event: EventT[bytes]) -> None:
        acked.append(event)

    settings = BatchSettings(min_wait_ms=0, max_wait_ms=0, max_queued=1)
    batches: AdaptiveBatcher[Pending] = AdaptiveBatcher(settings, lambda _m: ModelLimits(1, 4))
    stage = BatchStage(
        cast(Pipeline, pipeline), cast(InferenceRunner, runner or Runner()), batches, ack
    )
    return stage, acked


def request_envelope(deadline_s: float | None = None) -> Envelope:
    request = LLMRequest.model_validate(
        {"id": "r", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}]}
    )
    request.deadline = None if deadline_s is None else time.time() + deadline_s
    return Envelope(request=request, model=MODEL)


async def admitted(
    stage: BatchStage, envelope: Envelope, fused: bool
) -> tuple[EventT[bytes], EventT[bytes]]:
    """The event read from Kafka and the one the stage handled, once what the scheduler
    started is done."""
    message = Message("llm.stage.route", 0, 7, 0.0, 0, {}, b"k", b"v", None)
    read: EventT[bytes] = Event(APP, b"k", b"v", {}, message)
    handled: EventT[bytes] = LocalEvent(read, "llm.stage.batch", 1) if fused else read
    loop_task = asyncio.create_task(stage.scheduler.run())
    try:
        await (stage.admit_fused if fused else stage.admit)(handled, envelope)
        await asyncio.sleep(0.05)
        await stage.scheduler.drain()
        await asyncio.gather(*stage.handing_on)
    finally:
        loop_task.cancel()
    return read, handled


@pytest.mark.parametrize("fused", [False, True], ids=["read", "fused"])
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("answered", ["sent to postprocess"]),
        ("screened", []),
        ("queue full", ["failed batch_queue_full"]),
        ("deadline unreachable", ["failed deadline_exceeded"]),
        ("screen raised", ["crashed boom"]),
        ("model raised", ["crashed model down"]),
        ("expired while queued", ["failed deadline_exceeded"]),
    ],
)
async def test_every_exit_answers_the_request_and_lets_its_event_go_once(
    fused: bool, case: str, expected: list[str]
) -> None:
    """A fused request's event read from Kafka is held from admission: each exit must
    release it once, or its partition's commits stay pinned while the worker runs."""
    pipeline = StagePipeline(
        screened=case == "screened",
        screen_error=RuntimeError("boom") if case == "screen raised" else None,
    )
    stage, acked = stage_for(
        pipeline, Runner(RuntimeError("model down")) if "model" in case else None
    )
    batcher, deadline_s = stage.scheduler.batcher, None
    if case == "queue full":
        batcher.items_running = 1
    if "deadline" in case or "expired" in case:
        batcher._queue(MODEL).fit.record(1, 5.0)  # a batch takes 5 s
        deadline_s = 1.0 if "unreachable" in case else 6.0
    if case == "expired while queued":
        batcher._queue(MODEL).batches_running = 1  # the model's one slot is busy
    read, handled = await admitted(stage, request_envelope(deadline_s), fused)
    if case == "expired while queued":
        assert pipeline.done == []
        for item in batcher.expire(time.monotonic() + 60.0):
            await stage.expired(item)
    assert pipeline.done == expected + (["released"] if fused else [])
    assert acked == ([] if fused else [handled])
    assert read.message.refcount == 0


@pytest.mark.parametrize("fused", [False, True], ids=["read", "fused"])
async def test_an_answer_that_cannot_be_sent_keeps_its_event(fused: bool) -> None:
    """Unacked, the event is delivered again after a restart; acked, the request would be
    lost."""
    pipeline = StagePipeline(fail_error=ConnectionError("the responses topic is gone"))
    stage, acked = stage_for(pipeline)
    stage.scheduler.batcher.items_running = 1  # the queue is full: the stage answers at once
    read, _handled = await admitted(stage, request_envelope(), fused)
    assert pipeline.done == []
    assert acked == []
    assert read.message.refcount == (1 if fused else 0)


@pytest.mark.parametrize("fused", [False, True], ids=["read", "fused"])
async def test_a_stopping_stage_hands_its_queued_requests_back_to_its_topic(fused: bool) -> None:
    """Before, they waited for an answer no one would send, their events unacked."""
    pipeline = StagePipeline()
    stage, acked = stage_for(pipeline)
    stage.scheduler.batcher._queue(MODEL).batches_running = 1  # the model's one slot is busy
    read, handled = await admitted(stage, request_envelope(), fused)
    assert pipeline.done == []
    await stage.hand_back()
    assert pipeline.done == ["sent to batch"] + (["released"] if fused else [])
    assert acked == ([] if fused else [handled])
    assert read.message.refcount == 0
    assert stage.scheduler.batcher.take_all() == []

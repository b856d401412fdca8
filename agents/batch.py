"""Batch: per-model windows that close when full or when their wait runs out.

Each closed window goes to infer in this process (same key, no hop). Events are acked only
once their batch's answers are sent on, so a worker crash redelivers them; batches run
concurrently, and faust commits offsets only up to the oldest unacked event.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from faust import Stream
from faust.types import EventT, StreamT

from agents.infer import InferenceRunner
from schemas.messages import Envelope, ErrorCode
from streams import metrics
from streams.app import Pipeline
from streams.drivers.openai_http import OpenAIHTTPBackend

STAGE = "batch"
Item = TypeVar("Item")


class QueueFull(Exception):
    pass


@dataclass
class Window(Generic[Item]):
    opened_at: float
    items: list[Item] = field(default_factory=list)


class BatchWindows(Generic[Item]):
    """Open windows per model, bounded by `max_queued` requests across all of them,
    those of dispatched batches that have not finished included."""

    def __init__(self, max_size: int, max_wait_s: float, max_queued: int) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.windows: dict[str, Window[Item]] = {}
        self.in_flight = 0

    @property
    def queued(self) -> int:
        return sum(len(w.items) for w in self.windows.values()) + self.in_flight

    def add(self, model: str, item: Item, now: float) -> list[Item] | None:
        """Queue `item`; returns the model's batch when this item filled it."""
        if self.queued >= self.max_queued:
            raise QueueFull(f"{self.queued} requests already wait for a batch")
        window = self.windows.setdefault(model, Window(opened_at=now))
        window.items.append(item)
        if len(window.items) >= self.max_size:
            del self.windows[model]
            return window.items
        return None

    def due(self, now: float) -> list[tuple[str, list[Item]]]:
        """Close and return every window whose wait has run out."""
        ready = [m for m, w in self.windows.items() if now - w.opened_at >= self.max_wait_s]
        return [(m, self.windows.pop(m).items) for m in ready]

    def next_due(self) -> float | None:
        if not self.windows:
            return None
        return min(w.opened_at for w in self.windows.values()) + self.max_wait_s


def attach(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    windows: BatchWindows[tuple[EventT[bytes], Envelope]] = BatchWindows(
        settings.batch.max_size,
        settings.batch.max_wait_ms / 1000.0,
        settings.batch.max_queued,
    )
    backend = OpenAIHTTPBackend(
        settings.provider_url, settings.provider_api_key, settings.infer.max_concurrency
    )
    runner = InferenceRunner(settings, backend)
    running: set[asyncio.Task[None]] = set()

    @pipeline.app.agent(pipeline.stage_topics[STAGE], name=STAGE)
    async def batch(stream: StreamT[bytes]) -> None:
        manual = cast(Stream[bytes], stream).noack()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        async def run(model: str, items: list[tuple[EventT[bytes], Envelope]]) -> None:
            metrics.batch_size.labels(model).observe(len(items))
            try:
                await runner.run([e for _, e in items])
                for event, envelope in items:
                    pipeline.mark(envelope, "infer")
                    try:
                        await pipeline.send("postprocess", envelope)
                    except Exception as exc:
                        await pipeline.handle_crash(event, envelope, STAGE, exc)
            finally:
                windows.in_flight -= len(items)
                for event, _ in items:
                    await manual.ack(event)

        def dispatch(model: str, items: list[tuple[EventT[bytes], Envelope]]) -> None:
            windows.in_flight += len(items)
            task = asyncio.create_task(run(model, items))
            running.add(task)
            task.add_done_callback(running.discard)

        async def flush_when_due() -> None:
            while True:
                due_at = windows.next_due()
                timeout = None if due_at is None else max(0.0, due_at - loop.time())
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
                for model, items in windows.due(loop.time()):
                    dispatch(model, items)

        flusher = asyncio.create_task(flush_when_due())
        try:
            async for event, envelope in pipeline.envelopes(manual, STAGE):
                try:
                    if await pipeline.finish_if_expired(envelope, STAGE):
                        await manual.ack(event)
                        continue
                    model = envelope.model or ""
                    full = windows.add(model, (event, envelope), loop.time())
                except QueueFull as exc:
                    await pipeline.fail(
                        envelope, ErrorCode.OVERLOADED, "batch_queue_full", str(exc)
                    )
                    await manual.ack(event)
                    continue
                except Exception as exc:
                    await pipeline.handle_crash(event, envelope, STAGE, exc)
                    await manual.ack(event)
                    continue
                if full is not None:
                    dispatch(model, full)
                else:
                    wake.set()
        finally:
            flusher.cancel()
            await backend.close()

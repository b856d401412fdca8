import asyncio
import gc
import logging

import faust
import pytest

from llmflow.worker import Worker


def root_logger_after(worker_class: type[faust.Worker]) -> logging.Logger:
    """A stand-in root logger as `worker_class` sets it up for WARNING."""
    root = logging.Logger("stand-in-root")
    root.addHandler(logging.NullHandler())
    worker = worker_class(faust.App("test-worker-logging"), loglevel="WARNING")
    worker.on_setup_root_logger(root, logging.WARNING)
    return root


def test_the_root_logger_stays_at_the_level_asked_for() -> None:
    """faust's own worker leaves it at DEBUG, so every debug call builds a record."""
    assert root_logger_after(faust.Worker).isEnabledFor(logging.DEBUG)
    root = root_logger_after(Worker)
    assert not root.isEnabledFor(logging.DEBUG)
    assert root.isEnabledFor(logging.WARNING)


def test_what_lives_once_started_is_frozen_out_of_the_cyclic_collector(
    monkeypatch: pytest.MonkeyPatch, thawed_heap: None
) -> None:
    """Else a full collection walks it all: a 93 ms stall of the event loop under load."""

    async def started(_worker: faust.Worker) -> None:
        return None

    monkeypatch.setattr(faust.Worker, "on_startup_finished", started)
    worker = Worker(faust.App("test-worker-gc"), loglevel="WARNING")
    asyncio.run(worker.on_startup_finished())
    assert gc.get_freeze_count() > 0

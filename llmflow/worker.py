"""One faust worker: the stage agents `worker_stages` names (every one by default), plus
the metrics endpoint."""

from __future__ import annotations

import logging

import faust

from llmflow.heap import freeze_startup_heap
from streams import metrics
from streams.app import Pipeline
from topology.settings import Settings


class Worker(faust.Worker):
    """faust's worker, with the root logger left at the level asked for.

    For its start-up spinner faust sets the root logger to DEBUG, so every debug call in
    aiokafka and faust built a log record that the handlers then dropped: about 7 % of a
    worker's CPU at 100 req/s (py-spy).
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        logger.setLevel(level or logging.WARNING)

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        freeze_startup_heap()


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    pipeline = Pipeline(settings)
    pipeline.attach_agents()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    logging.getLogger("llmflow").setLevel(loglevel)
    Worker(pipeline.app, loglevel=loglevel).execute_from_commandline()

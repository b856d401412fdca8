"""One faust worker: the stage agents `worker_stages` names (every one by default), plus
the metrics endpoint."""

from __future__ import annotations

import logging

import faust

from streams import metrics
from streams.app import Pipeline
from topology.settings import Settings


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    pipeline = Pipeline(settings)
    pipeline.attach_agents()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    logging.getLogger("llmflow").setLevel(loglevel)
    faust.Worker(pipeline.app, loglevel=loglevel).execute_from_commandline()

"""A flood of malformed messages against a running worker on Tansu: it keeps running, answers
every id it can read with `invalid`, dead-letters every message, and still serves valid work.

10,000 messages here; `llmflow bench fuzz --count 100000` sends the issue's 100,000.
"""

from __future__ import annotations

import pytest

from bench.fuzz import check, flood, malformed
from llmflow.client import new_request
from schemas.messages import Status
from tests.integration.conftest import RunningPipeline, connected_client

pytestmark = pytest.mark.integration

COUNT = 10_000


@pytest.mark.timeout(900)
async def test_a_flood_of_malformed_messages_crashes_nothing(
    tansu_pipeline: RunningPipeline,
) -> None:
    cases = list(malformed(tansu_pipeline.settings, COUNT, seed=7))
    async with connected_client(tansu_pipeline):
        pass  # the worker is up before the flood
    worker = tansu_pipeline.workers.processes[0]
    log_path = tansu_pipeline.workers.run_dir / "worker-0.log"
    log_before = log_path.stat().st_size
    result = await flood(tansu_pipeline.settings, cases, answer_timeout_s=600, progress=False)
    report = check(cases, result)
    print(report, f"sent in {result.send_s:.1f} s, all answered at {result.answered_s:.1f} s")
    assert worker.poll() is None and tansu_pipeline.workers.processes[0].pid == worker.pid
    with log_path.open("rb") as log:
        log.seek(log_before)
        assert b"Traceback" not in log.read()
    assert report["unanswered"] == 0 and report["answered_otherwise"] == 0, report
    assert report["answered_invalid"] == report["readable_ids"] > 0, report
    assert report["dead_letters"] == COUNT, report
    assert report["dead_letters_missing"] == report["dead_letters_extra"] == 0, report
    assert report["internal_errors"] == 0, report
    async with connected_client(tansu_pipeline) as client:
        after = await client.call(new_request("still answering?", "fuzz-after"), timeout=120)
    assert after.status is Status.OK, after

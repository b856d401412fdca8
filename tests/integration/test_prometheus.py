"""A real Prometheus (the Debian package's server) scrapes a running worker: the answers sent
arrive as llmflow_responses_total, the seed's and the new metrics have values, and the alert
rules load and evaluate without error against that data.

It runs its own worker under its own app id and topics, so no other test's traffic moves
the counts it compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmflow.admin import create_topics, wait_for_stable_group
from llmflow.brokers import free_port
from llmflow.client import new_request
from llmflow.stack import SimulatedProvider, Workers, stop_process
from schemas.messages import Status
from tests.deploy.test_prometheus_rules import RULES, rules
from tests.integration.conftest import (
    WORKER_START_S,
    RunningPipeline,
    connected_client,
    pipeline_settings,
)

pytestmark = pytest.mark.integration

REDIS_DB = 4
REQUESTS = 20
TENANT = "scraped"
SCRAPE_S = 1
DEADLINE_S = 120.0


@contextlib.contextmanager
def prometheus(run_dir: Path, metrics_port: int) -> Iterator[str]:
    """A Prometheus server scraping the worker every second with the rules loaded; yields
    its base URL once it answers ready."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: scripts/system-deps.sh installs it"
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "llmflow", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (run_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (run_dir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={run_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={run_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ready(url):
            assert process.poll() is None, (run_dir / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        stop_process(process)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query's samples by their labels (the metric name left out)."""
    return {
        tuple(sorted((k, v) for k, v in row["metric"].items() if k != "__name__")): float(
            row["value"][1]
        )
        for row in api(url, "query", query=expr)["result"]
    }


def scalar(url: str, expr: str) -> float | None:
    values = list(query(url, expr).values())
    return values[0] if values else None


async def until(what: str, check: Any) -> Any:
    """Poll `check` until it returns something true; fail past a generous deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not (seen := check()):
        assert time.monotonic() < deadline, f"{what}: still {seen!r}"
        await asyncio.sleep(SCRAPE_S)
    return seen


async def test_prometheus_scrapes_a_worker_and_loads_the_rules(
    tansu_bootstrap: str, redis_url: str, provider: SimulatedProvider, tmp_path: Path
) -> None:
    own_redis = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    settings = pipeline_settings(tansu_bootstrap, own_redis, provider).namespaced("prom-")
    settings = settings.model_copy(update={"metrics_sample_s": 1.0})
    await create_topics(settings)
    with Workers(settings, tmp_path / "workers") as workers:
        await wait_for_stable_group(settings, 1, WORKER_START_S)
        running = RunningPipeline("tansu", settings, workers, provider)
        async with connected_client(running) as client:
            requests = [new_request(f"scrape {i} {uuid.uuid4()}", TENANT) for i in range(REQUESTS)]
            answers = await asyncio.gather(*(client.call(r, timeout=DEADLINE_S) for r in requests))
        assert [a.status for a in answers] == [Status.OK] * REQUESTS
        sent = REQUESTS + 1  # and the warm-up

        with prometheus(tmp_path, workers.metrics_ports[0]) as url:
            total = 'sum(llmflow_responses_total{job="llmflow"})'
            await until("responses scraped", lambda: scalar(url, total) == sent)
            assert scalar(url, 'sum(llmflow_responses_total{status="ok"})') == sent
            assert (scalar(url, "sum(llmflow_batch_processing_latency_seconds_count)") or 0) >= 1
            calls = scalar(url, 'sum(llmflow_upstream_calls_total{outcome="ok"})')
            assert scalar(url, "sum(llmflow_upstream_latency_seconds_count)") == calls == sent
            assert scalar(url, "sum(llmflow_overhead_latency_seconds_count)") == sent
            assert (scalar(url, 'sum(llmflow_tokens_total{kind="completion"})') or 0) > 0
            spend = f'sum(llmflow_spend_usd_total{{tenant="{TENANT}"}})'
            assert (scalar(url, spend) or 0) > 0
            assert scalar(url, "llmflow_requests_in_flight") == 0
            assert scalar(url, "llmflow_request_deduplication_rate") == 0
            assert scalar(url, 'llmflow_cache_hit_rate_by_type{kind="exact"}') == 0
            for resource in ("cpu", "memory"):
                share = f'llmflow_resource_utilization_rate{{resource="{resource}"}}'
                assert 0 < (scalar(url, share) or 0) <= 1, resource
            efficiency = scalar(url, "llmflow_parallel_processing_efficiency")
            assert efficiency is not None and 0 < efficiency <= 1
            lags = query(url, "llmflow_consumer_lag")
            assert lags and all(lag >= 0 for lag in lags.values())
            assert any(dict(labels)["topic"] == settings.topics.requests.name for labels in lags)

            def evaluated() -> list[dict[str, Any]]:
                groups = api(url, "rules")["groups"]
                loaded = [rule for group in groups for rule in group["rules"]]
                done = len(loaded) == len(rules()) and all(r["health"] == "ok" for r in loaded)
                return loaded if done else []

            loaded = await until("every rule evaluated", evaluated)
            assert {rule["name"] for rule in loaded} == {rule["alert"] for rule in rules()}
            cpu = scalar(url, 'llmflow_resource_utilization_rate{resource="cpu"}')
            overhead = scalar(
                url,
                "histogram_quantile(0.5, sum by (le) (llmflow_overhead_latency_seconds_bucket))",
            )
            print(
                f"scraped {sent} responses; {len(lags)} partitions' lag, max {max(lags.values())};"
                f" parallel efficiency {efficiency:.3f}; cpu {cpu}; overhead p50 {overhead} s"
            )

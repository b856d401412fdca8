"""End to end over real brokers: every request gets exactly one terminal response.

Each test runs on Apache Kafka (two workers, one consumer group) and on the embedded
Tansu broker (one worker); the 500-request run is Kafka only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from llmflow.client import LLMFlowClient, new_request
from llmflow.demo import build_workload
from llmflow.prompts import load_prompts
from schemas.messages import (
    DeadLetter,
    ErrorCode,
    LLMRequest,
    LLMResponse,
    Priority,
    Status,
    StreamChunk,
    dump,
)
from tests.integration.conftest import (
    SHED_QUEUED_MS,
    TINY_LIMIT,
    TINY_TENANT,
    WORKER_START_S,
    RunningPipeline,
    connected_client,
)
from topology.settings import to_env

pytestmark = pytest.mark.integration


async def answer_all(
    client: LLMFlowClient, requests: list[LLMRequest], timeout: float = 120.0
) -> dict[str, LLMResponse]:
    futures = [await client.submit(r) for r in requests]
    done, pending = await asyncio.wait(futures, timeout=timeout)
    assert not pending, f"{len(pending)} of {len(requests)} requests got no answer"
    responses = [f.result() for f in done]
    return {r.id: r for r in responses}


async def read_topic(bootstrap: str, topic: str, wanted: int, timeout: float) -> list[bytes]:
    """Every message of `topic` from the start, until `wanted` arrived or `timeout` passed."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < wanted and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            values.extend(m.value or b"" for records in batch.values() for m in records)
    finally:
        await consumer.stop()
    return values


async def streamed_chunks(pipeline: RunningPipeline, request_id: str) -> list[StreamChunk]:
    """The stream topic's chunks of one request, in index order."""
    values = await read_topic(
        pipeline.settings.bootstrap_servers,
        pipeline.settings.topics.stream.name,
        wanted=100_000,
        timeout=5,
    )
    chunks = (StreamChunk.model_validate_json(v) for v in values)
    return sorted((c for c in chunks if c.id == request_id), key=lambda c: c.index)


def check_duplicates_and_repeats(
    first_wave: list[LLMRequest], answers: dict[str, LLMResponse]
) -> Counter[str]:
    """Identical requests sent together: one model call, the others merged into it, or,
    when the CPU is slow enough that a copy reaches dedup after the model answered, served
    from the cache (and a copy that waited on that one merged into it)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for request in first_wave:
        groups[(request.tenant, request.messages[0].content)].append(request.id)
    shapes: Counter[str] = Counter()
    for ids in groups.values():
        statuses = sorted(answers[i].status.value for i in ids)
        leaders = [i for i in ids if answers[i].status is Status.OK]
        assert len(leaders) == 1, f"group {ids} answered {statuses}"
        for follower in set(ids) - set(leaders):
            assert answers[follower].status in (Status.MERGED, Status.CACHED), statuses
            if answers[follower].status is Status.MERGED:
                assert answers[follower].merged_with in ids
            assert answers[follower].output == answers[leaders[0]].output
        shapes["group" if len(ids) > 1 else "single"] += 1
    return shapes


async def answer_demo_workload(
    client: LLMFlowClient, prompts: list[str], seed: int, count: int = 40
) -> tuple[dict[str, LLMResponse], dict[str, LLMResponse]]:
    """A warm-up, then the demo's two waves: copies sent together lead once and merge or hit
    the cache, repeats of answered prompts are served from the cache, each answered once."""
    warm = await client.call(new_request(f"warm-up {uuid.uuid4()}", "warm-up"), WORKER_START_S)
    assert warm.status is Status.OK, warm
    workload = build_workload(count, prompts, seed=seed)
    first = await answer_all(client, workload.first_wave, timeout=180.0)
    shapes = check_duplicates_and_repeats(workload.first_wave, first)
    assert shapes["group"] >= 2, shapes
    second = await answer_all(client, workload.second_wave, timeout=180.0)
    assert {r.status for r in second.values()} == {Status.CACHED}
    assert len(first) + len(second) == count
    await asyncio.sleep(1.0)
    assert client.duplicates == 0
    return first, second


async def test_500_requests_each_answered_once_with_merges_and_cache_hits(
    kafka_pipeline: RunningPipeline,
) -> None:
    async with connected_client(kafka_pipeline) as client:
        await run_500(kafka_pipeline, client)


async def run_500(pipeline: RunningPipeline, client: LLMFlowClient) -> None:
    calls_before = pipeline.provider_stats()["calls"]
    workload = build_workload(500, load_prompts(500), seed=11)
    first = await answer_all(client, workload.first_wave)
    second = await answer_all(client, workload.second_wave)

    assert len(first) + len(second) == 500
    shapes = check_duplicates_and_repeats(workload.first_wave, first)
    assert shapes["group"] >= 30, shapes
    copies = len(workload.first_wave) - len(
        {(r.tenant, r.messages[0].content) for r in workload.first_wave}
    )
    merged = sum(1 for r in first.values() if r.status is Status.MERGED)
    assert merged >= copies // 2, f"{merged} of {copies} copies merged"
    assert {r.status for r in second.values()} == {Status.CACHED}
    for request in workload.second_wave:
        answer = second[request.id]
        assert answer.cache_kind == "exact" and answer.cost_usd == 0.0
        assert answer.output and answer.tenant == request.tenant
    model_calls = sum(1 for r in first.values() if r.status is Status.OK)
    assert pipeline.provider_stats()["calls"] - calls_before == model_calls
    await asyncio.sleep(1.0)
    assert client.duplicates == 0
    assert all(pipeline.workers.alive())


async def test_smoke_duplicates_repeats_and_bad_input(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    """The smoke test both brokers run: merges, cache hits, one bad message, one more request."""
    workload = build_workload(40, load_prompts(540)[500:], seed=5)
    first = await answer_all(client, workload.first_wave)
    check_duplicates_and_repeats(workload.first_wave, first)
    second = await answer_all(client, workload.second_wave)
    assert {r.status for r in second.values()} == {Status.CACHED}

    bad_id = f"bad-{uuid.uuid4().hex}"
    waiting = client.expect(bad_id)
    await client.send_raw(json.dumps({"id": bad_id, "tenant": "acme"}).encode())
    rejected = await asyncio.wait_for(waiting, 60)
    assert rejected.status is Status.ERROR and rejected.error is not None
    assert rejected.error.code is ErrorCode.INVALID and rejected.error.reason == "schema"
    after = await client.call(new_request(f"still running? {uuid.uuid4()}", "acme"), timeout=60)
    assert after.status is Status.OK
    assert all(pipeline.workers.alive())


async def test_tenant_over_its_limit_is_rate_limited_with_retry_after(
    client: LLMFlowClient,
) -> None:
    requests = [new_request(f"limit probe {uuid.uuid4()}", TINY_TENANT) for _ in range(10)]
    answers = await answer_all(client, requests)
    limited = [r for r in answers.values() if r.error and r.error.code is ErrorCode.RATE_LIMITED]
    allowed = [r for r in answers.values() if r.status is Status.OK]
    assert len(allowed) + len(limited) == 10
    assert int(TINY_LIMIT.burst) <= len(allowed) <= int(TINY_LIMIT.burst) + 1
    for response in limited:
        assert response.status is Status.ERROR
        assert response.error is not None and response.error.retry_after_s is not None
        assert 0 < response.error.retry_after_s <= 1 / TINY_LIMIT.per_second


def bad_inputs(reply_topic: str) -> dict[str, tuple[bytes, str | None]]:
    """Each kind of bad input: raw bytes and the id an answer must carry (None: no id)."""

    def request(**fields: object) -> dict[str, object]:
        rid = f"bad-{uuid.uuid4().hex}"
        base: dict[str, object] = {
            "id": rid,
            "tenant": "acme",
            "reply_topic": reply_topic,
            "messages": [{"role": "user", "content": "hi"}],
        }
        base.update(fields)
        return base

    def encoded(fields: dict[str, object]) -> tuple[bytes, str | None]:
        return json.dumps(fields).encode(), str(fields["id"])

    unicode_request, surrogate_request = request(), request()
    raw_unicode = json.dumps(unicode_request).encode().replace(b'"hi"', b'"h\xff\xfei"')
    raw_surrogate = json.dumps(surrogate_request).encode().replace(b'"hi"', b'"\\ud800"')
    return {
        "not_json": (b"{this is not json", None),
        "schema": encoded(request(messages=[])),
        "oversized": encoded(request(messages=[{"role": "user", "content": "x" * 70_000}])),
        "unknown_model": encoded(request(model="gpt-imaginary")),
        "bad_max_tokens": encoded(request(params={"max_tokens": -5})),
        "bad_max_tokens_absurd": encoded(request(params={"max_tokens": 10**9})),
        "invalid_unicode": (raw_unicode, str(unicode_request["id"])),
        "lone_surrogate": (raw_surrogate, str(surrogate_request["id"])),
    }


async def test_every_bad_input_gets_an_error_and_a_dead_letter(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    cases = bad_inputs(pipeline.settings.topics.responses.name)
    waiting = {}
    for kind, (raw, rid) in cases.items():
        if rid is not None:
            waiting[kind] = client.expect(rid)
        await client.send_raw(raw)
    answers = {kind: await asyncio.wait_for(f, 60) for kind, f in waiting.items()}
    expected_reason = {k: k.removesuffix("_absurd") for k in cases}
    expected_reason["lone_surrogate"] = "invalid_unicode"
    for kind, response in answers.items():
        assert response.status is Status.ERROR and response.error is not None, kind
        assert response.error.code is ErrorCode.INVALID, kind
        assert response.error.reason == expected_reason[kind], (kind, response.error)
        assert response.error.message, kind

    raws = {raw: kind for kind, (raw, _) in cases.items()}
    found: dict[str, DeadLetter] = {}
    for value in await read_topic(
        pipeline.settings.bootstrap_servers,
        pipeline.settings.topics.dlq.name,
        wanted=10_000,
        timeout=15,
    ):
        letter = DeadLetter.model_validate_json(value)
        letter_kind = raws.get(base64.b64decode(letter.raw_b64))
        if letter_kind is not None:
            found[letter_kind] = letter
    assert set(found) == set(cases), set(cases) - set(found)
    for kind, letter in found.items():
        assert letter.reason == expected_reason[kind], (kind, letter.reason)
        assert letter.source_topic == pipeline.settings.topics.requests.name
        assert letter.source_offset is not None

    after = await client.call(new_request(f"after bad input {uuid.uuid4()}", "acme"), 60)
    assert after.status is Status.OK
    assert all(pipeline.workers.alive())


async def test_a_request_that_queued_too_long_is_shed_but_high_priority_is_served(
    client: LLMFlowClient,
) -> None:
    """Stamped twice `limits.shed_queued_ms` ago, as if it had queued that long."""
    stamp_ms = int(time.time() * 1000 - 2 * SHED_QUEUED_MS)
    queued = new_request(f"queued {uuid.uuid4()}", "acme")
    urgent = new_request(f"urgent {uuid.uuid4()}", "acme", priority=Priority.HIGH)
    answers = [client.expect(r.id) for r in (queued, urgent)]
    for request in (queued, urgent):
        await client.send_raw(dump(request), key=request.id.encode(), timestamp_ms=stamp_ms)
    shed, served = [await asyncio.wait_for(answer, 60.0) for answer in answers]
    assert shed.error is not None, shed
    assert (shed.error.code, shed.error.reason) == (ErrorCode.OVERLOADED, "queued_too_long")
    assert served.status is Status.OK, served


async def test_deadline_passed_gets_timeout(client: LLMFlowClient) -> None:
    request = new_request(f"too late {uuid.uuid4()}", "acme", deadline=time.time() - 1)
    response = await client.call(request, timeout=60)
    assert response.status is Status.ERROR and response.error is not None
    assert response.error.code is ErrorCode.TIMEOUT


async def test_streamed_request_gets_chunks_then_its_response(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    request = new_request(f"stream this {uuid.uuid4()}", "acme", stream=True)
    response = await client.call(request, timeout=60)
    assert response.status is Status.OK and response.output
    mine = await streamed_chunks(pipeline, request.id)
    assert mine and mine[-1].done
    assert "".join(c.delta for c in mine) == response.output


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_workers_serve_stage_latency_and_status_metrics(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    await client.call(new_request(f"metrics {uuid.uuid4()}", "acme"), timeout=60)
    samples = [scrape(port) for port in pipeline.workers.metrics_ports]

    def total(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return sum(s.get((name, key), 0.0) for s in samples)

    for stage in (
        "preprocess",
        "ratelimit",
        "dedup",
        "cache",
        "route",
        "batch",
        "infer",
        "postprocess",
        "respond",
    ):
        assert total("llmflow_stage_latency_seconds_count", stage=stage) > 0, stage
    assert total("llmflow_responses_total", status="ok", code="") > 0
    assert total("llmflow_request_latency_seconds_count", status="ok") > 0
    assert total("llmflow_cache_lookups_total", kind="exact", outcome="miss") > 0
    hit_rates = [s[k] for s in samples for k in s if k[0] == "llmflow_cache_hit_rate_by_type"]
    merge_rates = [s[k] for s in samples for k in s if k[0] == "llmflow_request_deduplication_rate"]
    assert hit_rates and all(0.0 <= rate <= 1.0 for rate in hit_rates + merge_rates)


async def test_cli_submit_prints_the_answer(
    pipeline: RunningPipeline, client: LLMFlowClient
) -> None:
    env = {**os.environ, **to_env(pipeline.settings)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmflow.cli",
        "submit",
        f"cli {uuid.uuid4()}",
        "--tenant",
        "acme",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    response = LLMResponse.model_validate_json(out)
    assert response.status is Status.OK and response.output


async def test_a_leader_running_out_of_its_own_time_does_not_fail_its_followers(
    client: LLMFlowClient,
) -> None:
    prompt = f"hurry {uuid.uuid4()}"
    leader = new_request(prompt, "acme", deadline=time.time() + 0.15)
    patient = new_request(prompt, "acme")
    answers = await answer_all(client, [leader, patient])
    late = answers[leader.id]
    assert late.error is not None and late.error.code is ErrorCode.TIMEOUT
    answer = answers[patient.id]
    assert answer.status is Status.OK and answer.output, answer

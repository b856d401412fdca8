import argparse
import asyncio
from typing import Any, get_args

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from bench.faults import provider_stats
from bench.floor import (
    Echo,
    add_arguments,
    echo_command,
    echo_reply,
    model_reply,
    share_rows,
)
from bench.pipeline import measure
from llmflow.brokers import start_broker
from llmflow.cli import _embedded
from llmflow.stack import fixed_latency
from schemas.messages import ChatMessage, LLMRequest, LLMResponse, Status, dump
from tests.http_server import serving
from topology.settings import load_settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    return parser.parse_args(argv)


REQUEST = LLMRequest(
    id="r-1",
    tenant="acme",
    messages=[ChatMessage.model_validate({"role": "user", "content": "hi"})],
    reply_topic="replies.a",
)


def test_an_echo_answers_ok_on_the_request_s_reply_topic_keyed_by_its_id() -> None:
    request = REQUEST
    topic, key, value = echo_reply(dump(request))
    response = LLMResponse.model_validate_json(value)
    assert (topic, key) == ("replies.a", b"r-1")
    assert (response.id, response.tenant, response.status) == ("r-1", "acme", Status.OK)
    assert response.upstream_ms == 0.0 and response.error is None
    no_reply_topic = request.model_copy(update={"reply_topic": None})
    assert echo_reply(dump(no_reply_topic))[0] is None


def test_an_echo_refuses_what_is_not_a_request() -> None:
    with pytest.raises(ValidationError):
        echo_reply(b'{"id": "r-1"}')


async def test_the_model_echo_answers_with_the_model_s_reply_and_its_time() -> None:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        await asyncio.sleep(0.02)
        return web.json_response({"choices": [{"message": {"content": "hello back"}}]})

    async with serving({"/v1/chat/completions": chat}) as url:
        settings = load_settings().model_copy(update={"provider_url": f"{url}/v1"})
        async with aiohttp.ClientSession() as session:
            topic, key, value = await model_reply(session, settings, dump(REQUEST))
            named = REQUEST.model_copy(update={"model": "sim-large"})
            await model_reply(session, settings, dump(named))
    response = LLMResponse.model_validate_json(value)
    assert (topic, key, response.status) == ("replies.a", b"r-1", Status.OK)
    assert response.output == "hello back" and response.upstream_ms >= 20
    assert bodies[0] == {
        "model": settings.route.small_model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": REQUEST.params.max_tokens,
    }
    assert bodies[1]["model"] == "sim-large"


def test_share_rows_gives_each_part_s_cpu_per_run() -> None:
    def run(workers: float, client: float) -> dict[str, Any]:
        return {
            "stack": {
                "workers": {"cpu_percent_of_one_core": workers},
                "client": {"cpu_percent_of_one_core": client},
            }
        }

    rows = share_rows({"faust": run(80.0, 30.5), "aiokafka": run(40.0, 31.0)}).splitlines()
    cells = [row.split()[-2:] for row in rows]
    assert cells == [["80.0", "40.0"], ["30.5", "31.0"], ["0.0", "0.0"], ["0.0", "0.0"]]
    assert [row.split()[0] for row in rows] == ["workers", "client", "broker", "provider"]


def test_every_worker_is_measured_by_default_llmflow_first_and_one_of_each() -> None:
    args = parse([])
    assert args.kinds == ["llmflow", "faust-model", "faust", "aiokafka"]
    assert args.workers == 1 and args.json == "out/floor.json"
    assert args.rate == args.search_start == 100.0
    assert parse(["--kinds", "aiokafka"]).kinds == ["aiokafka"]


@pytest.mark.integration
@pytest.mark.parametrize("echo", get_args(Echo))
def test_an_echo_worker_answers_every_request_of_the_bench_client(echo: Echo) -> None:
    args = parse(
        [
            *("--rate", "10", "--duration", "2", "--seed", "3", "--timeout-s", "60"),
            *("--broker", "tansu"),
        ]
    )
    broker = start_broker(args.broker)
    stack = _embedded(load_settings(), 1, fixed_latency(30), broker, echo_command(echo))
    with stack as (settings, workers):
        pids = [p.pid for p in workers.processes]
        report = asyncio.run(measure(settings, pids, args, broker.pid))
        calls = provider_stats(settings.provider_url.removesuffix("/v1"))["calls"]
    assert report["requests"] == 20 and report["statuses"] == {"ok": 20}
    assert calls == (60 if echo == "faust-model" else 0)
    assert report["warm_up"]["statuses"] == {"ok": 40}
    assert report["cpu_ms_per_request"]["workers"] > 0
    assert report["stack"]["broker"]["cpu_s"] > 0

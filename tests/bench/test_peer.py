"""`llmflow bench peer`'s pure parts: LiteLLM's config, the venv stamp, the settings the
pipeline gets, the workload slices, the sender against a local HTTP server, the ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import bench.load
from bench.load import SustainCriteria, WorkItem, WorkloadSpec
from bench.peer import (
    MODEL,
    ItemStream,
    Plan,
    Target,
    all_ratios,
    bench_settings,
    http_sender,
    items_for,
    litellm_config,
    peer_venv_current,
    provider_ms_of,
    ratio,
    ratios,
    requirements_digest,
    search_rates,
    table_rows,
    workload,
)
from tests.http_server import serving
from topology.settings import Settings

PROMPTS = [f"distinct prompt number {n}" for n in range(50)]


def plan(**change: Any) -> Plan:
    values: dict[str, Any] = {
        "latency_ms": 50.0,
        "rate_rps": 10.0,
        "requests": 30,
        "start_rps": 10.0,
        "max_rps": 40.0,
        "trial_s": 2.0,
        "refine_steps": 2,
        "criteria": SustainCriteria(),
        "seed": 0,
    }
    return Plan(**{**values, **change})


def item(tenant: str = "t", content: str = "hello") -> WorkItem:
    messages = [{"role": "user", "content": content}]
    return WorkItem(id="i", tenant=tenant, messages=messages, max_tokens=8, kind="unique")


def test_litellm_config_passes_each_model_to_the_provider_with_nothing_else_on() -> None:
    config = litellm_config("http://127.0.0.1:9/v1", ["sim-small", "sim-large"], "sk-x")
    models = config["model_list"]
    assert [m["model_name"] for m in models] == ["sim-small", "sim-large"]
    assert models[1]["litellm_params"]["model"] == "openai/sim-large"
    assert {m["litellm_params"]["api_base"] for m in models} == {"http://127.0.0.1:9/v1"}
    assert config["litellm_settings"]["telemetry"] is False
    assert config["litellm_settings"]["num_retries"] == 0
    assert config["litellm_settings"]["callbacks"] == []
    assert config["general_settings"]["master_key"] == "sk-x"
    assert "database_url" not in config["general_settings"]
    assert config["general_settings"]["disable_spend_logs"] is True
    json.dumps(config)  # written as JSON, which YAML reads


def test_the_peer_venv_is_current_only_when_stamped_with_the_requirements_digest(
    tmp_path: Path,
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("litellm[proxy]==1.0\n")
    venv = tmp_path / "venv"
    assert not peer_venv_current(venv, requirements)
    venv.mkdir()
    (venv / ".installed").write_text(requirements_digest(requirements) + "\n")
    assert peer_venv_current(venv, requirements)
    requirements.write_text("litellm[proxy]==2.0\n")
    assert not peer_venv_current(venv, requirements)


def test_bench_settings_give_each_tenant_a_key_and_lift_the_rate_limits() -> None:
    base = Settings()
    settings, keys = bench_settings(base, ["a", "b"])
    assert keys == {"sk-a": "a", "sk-b": "b"}
    assert {k: v.tenant for k, v in settings.ingress.api_keys.items()} == keys
    quota = settings.ratelimit.for_tenant("a")
    assert quota.tenant.requests is not None and quota.tenant.requests.per_second >= 1e6
    assert not settings.ratelimit.adaptive.enabled
    assert base.ratelimit.adaptive.enabled  # the base is left as it was


def test_provider_time_is_known_for_calls_zero_for_hits_unknown_for_followers() -> None:
    assert provider_ms_of("ok", 50.0) == 50.0
    assert provider_ms_of("cached", 50.0) == 0.0
    assert provider_ms_of("merged", 50.0) is None


def test_the_item_stream_never_hands_out_an_item_twice_until_restarted() -> None:
    items = [item(content=str(n)) for n in range(5)]
    stream = ItemStream(items)
    assert stream.take(2) == items[:2]
    assert stream.take(3) == items[2:]
    try:
        stream.take(1)
    except ValueError as error:
        assert "exhausted" in str(error)
    else:
        raise AssertionError("an exhausted stream handed out an item")
    stream.restart()
    assert stream.take(1) == items[:1]


def test_search_rates_bound_every_rate_the_search_may_try() -> None:
    assert search_rates(10, 40, 2) == [10, 20, 40, 40, 40]
    assert search_rates(10, 30, 0) == [10, 20, 30]
    assert search_rates(50, 20, 1) == [20, 20]
    assert items_for(0.5, 2.0) == 100
    assert items_for(300.0, 2.0) == 600


def test_a_workload_has_enough_unique_items_for_the_longest_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench.load, "load_prompts", lambda count, _chars: PROMPTS)
    the_plan = plan()
    spec = WorkloadSpec(count=0, duplicate_share=0.0, near_duplicate_share=0.0, tenants=2)
    items = workload(spec, the_plan, "unique")
    needed = 20 + 30 + sum(items_for(r, 2.0) for r in [10, 20, 40, 40, 40])
    assert len(items) == needed
    assert len({(i.tenant, i.prompt) for i in items}) == needed
    assert all(i.tenant.endswith("-unique") for i in items)
    assert len({i.id for i in items}) == needed
    no_search = workload(spec, plan(search=False), "unique")
    assert len(no_search) == 50


def test_ratios_are_llmflow_over_litellm_and_none_without_a_denominator() -> None:
    llmflow = {"max_sustained_rps": 300.0, "overhead_ms": {"p50": 2.0, "p99": 6.0}}
    litellm = {"max_sustained_rps": 50.0, "overhead_ms": {"p50": 8.0, "p99": 24.0}}
    assert ratios(llmflow, litellm) == {
        "throughput_ratio": 6.0,
        "overhead_p99_ratio": 0.25,
        "overhead_p50_ratio": 0.25,
    }
    assert ratio(1.0, 0.0) is None
    assert ratio(2.0, 3.0) == 0.667


def test_the_table_has_one_column_per_system() -> None:
    system = {
        "rate_rps": 10.0,
        "sent_rps": 9.8,
        "answered_share": 1.0,
        "latency_ms": {"p50": 60.0, "p99": 70.0},
        "overhead_ms": {"p50": 10.0, "p99": 20.0},
        "provider_calls": 33,
        "statuses": {"ok": 30},
    }
    numbers = {
        "direct": system,
        "llmflow": {**system, "max_sustained_rps": 80.0},
        "litellm": {**system, "max_sustained_rps": 40.0},
    }
    rows = dict(table_rows(numbers))
    assert rows["max sustained req/s"] == ["-", "80.0", "40.0"]
    assert rows["overhead p50 / p99 ms"] == ["10.0 / 20.0"] * 3
    assert rows["fixed rate req/s (sent)"] == ["10 (9.8)"] * 3
    with_floor = dict(table_rows({**numbers, "floor": {**system, "max_sustained_rps": 700.0}}))
    assert with_floor["max sustained req/s"] == ["-", "80.0", "700.0", "40.0"]


def test_the_floor_s_ratios_sit_beside_llmflow_s_when_it_was_measured() -> None:
    def system(rps: float, p99: float) -> dict[str, Any]:
        return {"max_sustained_rps": rps, "overhead_ms": {"p50": p99 / 2, "p99": p99}}

    systems = {"llmflow": system(80.0, 30.0), "litellm": system(120.0, 60.0)}
    assert all_ratios(systems) == ratios(systems["llmflow"], systems["litellm"])
    with_floor = all_ratios({**systems, "floor": system(720.0, 15.0)})
    assert with_floor["throughput_ratio"] == 0.667
    assert with_floor["floor_throughput_ratio"] == 6.0
    assert with_floor["floor_overhead_p99_ratio"] == 0.25


async def test_the_sender_posts_openai_requests_and_reads_llmflows_status() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers["Authorization"], body))
        if body["messages"][0]["content"] == "refuse":
            return web.json_response({"error": {"message": "no"}}, status=429)
        headers = {"x-llmflow-status": "cached"} if request.path.startswith("/llmflow") else {}
        answer = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}
        return web.json_response(answer, headers=headers)

    posts = {"/llmflow/v1/chat/completions": chat, "/plain/v1/chat/completions": chat}
    async with serving(posts) as url, aiohttp.ClientSession() as session:
        llmflow = Target("llmflow", f"{url}/llmflow/v1", lambda i: i.tenant)
        plain = Target("plain", f"{url}/plain/v1", lambda _i: "sk-m")
        cached = await http_sender(session, llmflow, 50.0)(item(tenant="sk-t"))
        ok = await http_sender(session, plain, 50.0)(item())
        refused = await http_sender(session, plain, 50.0)(item(content="refuse"))
    assert (cached.status, cached.provider_ms) == ("cached", 0.0)
    assert (ok.status, ok.provider_ms) == ("ok", 50.0)
    assert refused.status == "error_http_429" and refused.provider_ms is None
    assert seen[0][0] == "Bearer sk-t" and seen[1][0] == "Bearer sk-m"
    assert seen[0][1] == {"model": MODEL, "messages": item().messages, "max_tokens": 8}

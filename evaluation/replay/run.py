"""`llmflow eval-replay`: real prompts through the running pipeline, and what answered them.

The workload is ShareGPT as people typed it: the first turns of the first N conversations in
file order, repeats kept (natural exact and near repeats are what the caches should catch),
later turns sent with the real conversation before them, and synthetic agent loops whose
turns repeat the last user message while the tool result changes. Each answer is counted by
the path that produced it (model, exact or semantic cache, exact or semantic merge, error),
and every answer served from the cache or a merge is traced back to the request whose model
call produced it: served across a different context (tenant, system prompt, earlier turns,
tool results, params) it is a stale replay.

The stack itself is started by `llmflow.cli` (as `llmflow up` starts it); this module builds
the workload, sends it and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import json
import random
import unicodedata
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmflow.client import LLMFlowClient
from llmflow.demo import format_rows, percentile
from llmflow.prompts import Conversation, load_conversations
from llmflow.reports import figure, write_report
from schemas.messages import ChatMessage, LLMRequest, LLMResponse, Role, Status
from topology.settings import Settings

FIRST, LATER, AGENT = "first_turn", "later_turn", "agent_turn"
KINDS = (FIRST, LATER, AGENT)
MODEL = "model"
SERVED = ("cache_exact", "cache_semantic", "merge_exact", "merge_semantic")
PATHS = (MODEL, *SERVED)
MISSING = "missing"
# A request with its history stays well inside the pipeline's 64 KiB message limit.
MAX_REQUEST_CHARS = 16_000
# Slots (send positions) between two turns of one trace: a later turn follows its earlier
# one the way an agent's next call follows the answer, not at once.
TURN_GAP = 5
AGENT_SYSTEM = "You are an agent. Call tools, then answer from their results."
FOLLOW_UP = "Summarise the tool result for me."
TOOLS = (
    ("get_weather", "Oslo", "What is the weather in Oslo?"),
    ("get_stock_price", "ACME", "What is ACME trading at right now?"),
    ("get_order_status", "A-1042", "Where is my order A-1042?"),
    ("search_flights", "OSL-LHR", "Find me the next flight from Oslo to London."),
)
WARM_UP_TENANT = "llmflow-replay-warm-up"
STALE_EXAMPLES = 10
SEMANTIC_EXAMPLES = 20


@dataclass(frozen=True)
class Sent:
    """One request of the workload: which kind of turn it is and which trace it belongs to."""

    request: LLMRequest
    kind: str
    trace: str


def _request(tenant: str, messages: list[ChatMessage]) -> LLMRequest:
    return LLMRequest(id=uuid.uuid4().hex, tenant=tenant, messages=messages)


def tenant_for(trace: str, tenants: int) -> str:
    """A tenant fixed by the trace, so every turn of a conversation stays in its tenant."""
    digest = hashlib.sha256(trace.encode()).digest()
    return f"tenant-{int.from_bytes(digest[:4], 'big') % tenants}"


def conversation_turns(
    conversation: Conversation, max_turns: int, max_chars: int = MAX_REQUEST_CHARS
) -> list[list[ChatMessage]]:
    """The messages of each of the first `max_turns` human turns, the real conversation
    before it included; stops at the first turn that would exceed `max_chars`."""
    turns: list[list[ChatMessage]] = []
    size = 0
    for index, message in enumerate(conversation.messages):
        size += len(message.content)
        if size > max_chars or len(turns) >= max_turns:
            break
        if message.role is Role.USER:
            turns.append(conversation.messages[: index + 1])
    return turns


def agent_turns(trace: int, turns: int, seed: int) -> list[list[ChatMessage]]:
    """An agent loop: each turn adds a tool call and a fresh result, then asks the same
    follow-up; traces 2k and 2k+1 run the same task and differ only in the results."""
    tool, argument, task = TOOLS[(trace // 2) % len(TOOLS)]
    rng = random.Random(f"{seed}-{trace}")
    history = [
        ChatMessage(role=Role.SYSTEM, content=AGENT_SYSTEM),
        ChatMessage(role=Role.USER, content=task),
    ]
    loop: list[list[ChatMessage]] = []
    for turn in range(1, turns + 1):
        call = f"call-{turn}"
        result = json.dumps({"tool": tool, "reading": rng.randint(0, 999_999)})
        history = [
            *history,
            ChatMessage(role=Role.ASSISTANT, content=f"Calling {tool}({argument})."),
            ChatMessage(role=Role.TOOL, content=result, tool_call_id=call),
        ]
        loop.append([*history, ChatMessage(role=Role.USER, content=FOLLOW_UP)])
    return loop


def build_workload(
    conversations: list[Conversation],
    tenants: int,
    max_turns: int,
    agent_traces: int,
    turns_per_agent: int,
    seed: int = 7,
) -> list[Sent]:
    """Requests in send order: conversation i's first turn at slot i and its later turns
    `TURN_GAP` slots apart; agent trace pairs start evenly spread and side by side, so
    their turns with equal last messages are in flight together."""
    slotted: list[tuple[int, Sent]] = []
    for slot, conversation in enumerate(conversations):
        tenant = tenant_for(conversation.id, tenants)
        for turn, messages in enumerate(conversation_turns(conversation, max_turns)):
            sent = Sent(_request(tenant, messages), LATER if turn else FIRST, conversation.id)
            slotted.append((slot + turn * TURN_GAP, sent))
    pairs = (agent_traces + 1) // 2
    spacing = max(1, len(conversations) // max(1, pairs))
    for trace in range(agent_traces):
        tenant = tenant_for(f"agent-{trace // 2}", tenants)
        start = (trace // 2) * spacing
        for turn, messages in enumerate(agent_turns(trace, turns_per_agent, seed)):
            sent = Sent(_request(tenant, messages), AGENT, f"agent-{trace}")
            slotted.append((start + turn * TURN_GAP, sent))
    slotted.sort(key=lambda pair: pair[0])  # stable: file order within a slot
    return [sent for _, sent in slotted]


def answer_path(response: LLMResponse) -> str:
    """model, cache_exact/semantic, merge_exact/semantic or error_<code>; a merge without
    a merge_kind comes from a dedup stage that only knew exact merging."""
    if response.status is Status.OK:
        return MODEL
    if response.status is Status.CACHED:
        return f"cache_{response.cache_kind or 'exact'}"
    if response.status is Status.MERGED:
        return f"merge_{response.merge_kind or 'exact'}"
    return f"error_{response.error.code.value if response.error else 'unknown'}"


def _plain(text: str) -> str:
    """Text as preprocess normalises it, and whitespace-insensitive as the cache keys are."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def context(request: LLMRequest) -> str:
    """All that an answer depends on besides the last user turn's text. Written apart from
    the pipeline's own key (agents.semantic.context_key) so a fault there cannot hide."""
    last = request.last_user_index()
    messages = [
        [m.role.value, None if i == last else _plain(m.content), m.name, m.tool_call_id]
        for i, m in enumerate(request.messages)
    ]
    return json.dumps(
        {
            "tenant": request.tenant,
            "model": request.model,
            "api_type": request.api_type,
            "params": request.params.model_dump(mode="json"),
            "messages": messages,
        },
        sort_keys=True,
    )


def sources(responses: dict[str, LLMResponse]) -> dict[str, list[str]]:
    """For each answer served from the cache or a merge, the requests whose model call may
    have produced it: a merge names its leader; otherwise the output text tells, since the
    simulated provider puts a hash of the model and the whole conversation in it."""
    producers: dict[str, list[str]] = {}
    for request_id, response in responses.items():
        if response.status is Status.OK and response.output is not None:
            producers.setdefault(response.output, []).append(request_id)
    found: dict[str, list[str]] = {}
    for request_id, response in responses.items():
        if answer_path(response) not in SERVED:
            continue
        if response.merged_with is not None:
            found[request_id] = [response.merged_with]
        else:
            found[request_id] = producers.get(response.output or "", [])
    return found


@dataclass(frozen=True)
class Trace:
    """Where a served answer came from: `source` is None when no request of the workload
    produced it; `stale` when every request that could have had another context."""

    served: str
    source: str | None
    stale: bool


def trace_served(workload: list[Sent], responses: dict[str, LLMResponse]) -> dict[str, Trace]:
    """A trace per served answer, its source one of the same context where one exists (two
    contexts asking the same thing get the same text, and then neither answer is stale)."""
    by_id = {sent.request.id: sent.request for sent in workload}
    traces: dict[str, Trace] = {}
    for served, candidates in sources(responses).items():
        known = [c for c in candidates if c in by_id]
        same = [c for c in known if context(by_id[c]) == context(by_id[served])]
        source = next(iter(same or known), None)
        traces[served] = Trace(served, source, stale=bool(known) and not same)
    return traces


@dataclass
class Outcome:
    """What came back, filled in as answers arrive so a cut-short run still reports."""

    sent_s: dict[str, float] = field(default_factory=dict)
    responses: dict[str, LLMResponse] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    wall_s: float = 0.0
    aborted: str | None = None


async def _warm_up(client: LLMFlowClient, timeout: float) -> None:
    """One request first, so model loading is not charged to the replay's first requests."""
    request = _request(WARM_UP_TENANT, [ChatMessage(role=Role.USER, content="warm-up")])
    try:
        response = await client.call(request, timeout=timeout)
    except TimeoutError:
        print(f"warm-up: no answer in {timeout:.0f} s; replaying anyway", flush=True)
        return
    if response.error is not None:
        print(f"warm-up answered {response.error.code.value}: {response.error.reason}")


async def replay(
    client: LLMFlowClient, workload: list[Sent], rate: float, timeout: float, outcome: Outcome
) -> Outcome:
    """Send `workload` at `rate` requests a second, then wait up to `timeout` seconds for
    the answers still missing; latency runs from send to the answer reaching the client."""
    await _warm_up(client, timeout)
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress = tqdm(total=len(workload), desc="answers", unit="req")

    def answered(request_id: str, future: asyncio.Future[LLMResponse]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        outcome.responses[request_id] = future.result()
        outcome.latency_ms[request_id] = (loop.time() - start - outcome.sent_s[request_id]) * 1e3
        progress.update()

    futures: list[asyncio.Future[LLMResponse]] = []
    try:
        for index, sent in enumerate(workload):
            await asyncio.sleep(max(0.0, start + index / rate - loop.time()))
            outcome.sent_s[sent.request.id] = loop.time() - start
            future = await client.submit(sent.request)
            future.add_done_callback(functools.partial(answered, sent.request.id))
            futures.append(future)
        if futures:
            await asyncio.wait(futures, timeout=timeout)
    finally:
        progress.close()
        outcome.wall_s = loop.time() - start
        outcome.duplicates = client.duplicates
    return outcome


def semantic_layer_on(settings: Settings) -> Settings:
    """The replay measures the semantic layer too, so embedding and semantic cache are on."""
    return settings.model_copy(
        update={
            "embedding": settings.embedding.model_copy(update={"enabled": True}),
            "semantic": settings.semantic.model_copy(update={"enabled": True}),
        }
    )


def _latency(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 1), "p99": round(percentile(values, 0.99), 1)}


def _cost(responses: dict[str, LLMResponse], traces: dict[str, Trace]) -> dict[str, float]:
    """Upstream cost as run, and had every answered request gone to a model: a served
    answer is priced as the model call that produced it, else at the mean model call."""
    calls = {i: r.cost_usd for i, r in responses.items() if r.status is Status.OK}
    spent = sum(calls.values())
    mean = spent / len(calls) if calls else 0.0
    avoided = sum(calls.get(t.source or "", mean) for t in traces.values())
    without = spent + avoided
    return {
        "with_pipeline": round(spent, 6),
        "without_cache_or_merge": round(without, 6),
        "saved_share": round(avoided / without, 4) if without else 0.0,
    }


def _examples(
    workload: list[Sent], responses: dict[str, LLMResponse], traces: list[Trace]
) -> list[dict[str, str | None]]:
    """Served and source request side by side: tenant and last user turn of each."""
    by_id = {sent.request.id: sent.request for sent in workload}
    return [
        {
            "path": answer_path(responses[t.served]),
            "served_tenant": by_id[t.served].tenant,
            "served": by_id[t.served].last_user_turn(),
            "source_tenant": by_id[t.source].tenant,
            "source": by_id[t.source].last_user_turn(),
        }
        for t in traces
        if t.source is not None
    ]


@dataclass(frozen=True)
class Record:
    """One request's fate, kept in the report for plots and later analysis."""

    id: str
    kind: str
    tenant: str
    path: str
    source: str | None
    sent_s: float
    latency_ms: float | None


def records(workload: list[Sent], outcome: Outcome, traces: dict[str, Trace]) -> list[Record]:
    """One record per request in send order; `missing` where no answer came."""
    rows = []
    for sent in workload:
        request_id = sent.request.id
        response = outcome.responses.get(request_id)
        latency = outcome.latency_ms.get(request_id)
        trace = traces.get(request_id)
        rows.append(
            Record(
                id=request_id,
                kind=sent.kind,
                tenant=sent.request.tenant,
                path=MISSING if response is None else answer_path(response),
                source=None if trace is None else trace.source,
                sent_s=round(outcome.sent_s.get(request_id, 0.0), 3),
                latency_ms=None if latency is None else round(latency, 1),
            )
        )
    return rows


def report(workload: list[Sent], outcome: Outcome, run_settings: dict[str, Any]) -> dict[str, Any]:
    """Counts and shares per answer path (overall and per kind of turn), cache tiers,
    errors, latency, cost, stale replays, and one record per request for later plots."""
    responses = outcome.responses
    traces = trace_served(workload, responses)
    rows = records(workload, outcome, traces)
    counts = Counter(r.path for r in rows)
    by_kind = {kind: Counter(r.path for r in rows if r.kind == kind) for kind in KINDS}
    latencies: dict[str, list[float]] = {}
    for row in rows:
        if row.latency_ms is not None:
            latencies.setdefault(row.path, []).append(row.latency_ms)
    stale = [t for t in traces.values() if t.stale]
    semantic = [t for t in traces.values() if answer_path(responses[t.served]).endswith("semantic")]
    return {
        "requests": len(workload),
        "answered": len(responses),
        "missing": counts[MISSING],
        "duplicate_answers": outcome.duplicates,
        "aborted": outcome.aborted,
        "workload": {kind: sum(s.kind == kind for s in workload) for kind in KINDS},
        "paths": {
            path: {"count": n, "share": round(n / len(workload), 4)} for path, n in counts.items()
        },
        "paths_by_kind": {kind: dict(c) for kind, c in by_kind.items()},
        "cache_tiers": dict(Counter(r.cache_tier for r in responses.values() if r.cache_tier)),
        "latency_ms": {
            "all": _latency([v for vs in latencies.values() for v in vs]),
            **{path: _latency(values) for path, values in sorted(latencies.items())},
        },
        "cost_usd": _cost(responses, traces),
        "stale_replays": len(stale),
        "stale_examples": _examples(workload, responses, stale[:STALE_EXAMPLES]),
        "untraced_served": sum(t.source is None for t in traces.values()),
        "semantic_examples": _examples(workload, responses, semantic[:SEMANTIC_EXAMPLES]),
        "wall_s": round(outcome.wall_s, 2),
        "settings": run_settings,
        "records": [asdict(row) for row in rows],
    }


def _share(report: dict[str, Any], path: str) -> str:
    numbers = report["paths"].get(path, {"count": 0, "share": 0.0})
    return f"{numbers['count']} ({100 * numbers['share']:.1f} %)"


def table(report: dict[str, Any]) -> str:
    """The numbers a person reads first; the JSON has the rest."""
    errors = sorted(p for p in report["paths"] if p.startswith("error_"))
    served = {
        kind: sum(n for p, n in c.items() if p in SERVED)
        for kind, c in report["paths_by_kind"].items()
    }
    cost = report["cost_usd"]
    rows = [
        ("requests", str(report["requests"])),
        *((f"  {kind}s", str(n)) for kind, n in report["workload"].items()),
        ("answered", str(report["answered"])),
        *((path.replace("_", " "), _share(report, path)) for path in (*PATHS, *errors, MISSING)),
        *((f"  tier {tier}", str(n)) for tier, n in sorted(report["cache_tiers"].items())),
        *((f"served {kind}s", str(n)) for kind, n in served.items()),
        ("duplicate answers", str(report["duplicate_answers"])),
        ("latency p50 ms", f"{report['latency_ms']['all']['p50']:.1f}"),
        ("latency p99 ms", f"{report['latency_ms']['all']['p99']:.1f}"),
        *(
            (f"  {path} p50/p99 ms", f"{n['p50']:.1f} / {n['p99']:.1f}")
            for path, n in report["latency_ms"].items()
            if path != "all"
        ),
        ("upstream cost usd", f"{cost['with_pipeline']:.6f}"),
        ("  without cache/merge", f"{cost['without_cache_or_merge']:.6f}"),
        ("  saved", f"{100 * cost['saved_share']:.1f} %"),
        ("stale replays", str(report["stale_replays"])),
        ("untraced served", str(report["untraced_served"])),
        ("wall time s", f"{report['wall_s']:.1f}"),
    ]
    if report["aborted"]:
        rows.append(("aborted", report["aborted"]))
    return format_rows(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: the share of each answer path per kind of turn. Right: the share served so
    far over the run, by path (the caches fill as it goes)."""
    records = report["records"]
    present = {r["path"] for r in records}
    paths = [*PATHS, *sorted(present - set(PATHS))]
    color = {name: f"C{i}" for i, name in enumerate(paths)}  # one colour a path, both panels
    groups = {"all": records, **{k: [r for r in records if r["kind"] == k] for k in KINDS}}
    groups = {name: rows for name, rows in groups.items() if rows}
    with figure(path, 1, 2, dpi=120, figsize=(13, 4.5)) as (left, right):
        offsets = [0.0] * len(groups)
        for name in (p for p in paths if p in present):
            shares = [sum(r["path"] == name for r in rows) / len(rows) for rows in groups.values()]
            left.barh(list(groups), shares, left=offsets, label=name, color=color[name])
            offsets = [o + s for o, s in zip(offsets, shares, strict=True)]
        left.set(xlabel="share of requests", title="what answered each kind of turn")
        left.legend(fontsize=7, loc="lower right")
        xs = [r["sent_s"] for r in records]
        for name in SERVED:
            served = itertools.accumulate(r["path"] == name for r in records)
            shares = [n / (i + 1) for i, n in enumerate(served)]
            right.plot(xs, shares, label=name, color=color[name])
        right.set(xlabel="sent at (s)", ylabel="share of requests so far", title="served so far")
        right.legend(fontsize=7)


def workload_from_args(args: argparse.Namespace) -> list[Sent]:
    conversations = load_conversations(args.prompts)
    return build_workload(
        conversations, args.tenants, args.max_turns, args.agent_traces, args.agent_turns, args.seed
    )


def run_settings(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The replay's arguments and the pipeline settings its numbers depend on."""
    options = (
        "prompts", "rate", "tenants", "workers", "max_turns", "agent_traces", "agent_turns",
        "provider_latency_ms", "timeout", "seed",
    )  # fmt: skip
    return {
        **{name: getattr(args, name) for name in options},
        "redis": settings.redis_url is not None,
        "embedding": settings.embedding.model_dump(mode="json"),
        "semantic": settings.semantic.model_dump(mode="json"),
        "cache": settings.cache.model_dump(mode="json"),
        "dedup": settings.dedup.model_dump(mode="json"),
    }


def finish(
    args: argparse.Namespace, settings: Settings, workload: list[Sent], outcome: Outcome
) -> int:
    """Print the table, write the JSON (and the plot); 0 unless answers are missing."""
    result = report(workload, outcome, run_settings(args, settings))
    print(table(result), flush=True)
    write_report(result, args.json, args.plot, lambda path: plot(result, path))
    return 0 if result["missing"] == 0 and outcome.aborted is None else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--plot", help="where to write a PNG of the answer paths")
    parser.add_argument("--prompts", type=int, default=1000, help="ShareGPT conversations")
    parser.add_argument("--rate", type=float, default=10.0, help="requests a second")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-turns", type=int, default=3, help="human turns per conversation")
    parser.add_argument("--agent-traces", type=int, default=20, help="synthetic agent loops")
    parser.add_argument("--agent-turns", type=int, default=4, help="turns per agent loop")
    parser.add_argument("--provider-latency-ms", type=float, default=200.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="wait after the last send")
    parser.add_argument("--seed", type=int, default=7)

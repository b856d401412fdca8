"""`llmflow evaluate`: two runs of the same requests side by side, as JSON and an HTML page.

A run is what one namespace's pipeline answered: the requests on its request topic and
the first answer to each on its response topic (a second answer to an id, from
at-least-once redelivery, is counted, not used). The candidate is a shadow namespace fed by
`llmflow replay`; the baseline (the live pipeline, or another namespace) is compared on the
candidate's request ids, which a replay keeps. Latency runs from when a request was sent
(`metadata.replayed_at` for a replayed one, else `created_at`) to its answer's
`created_at`. An answer is checkable when its prompt is a zoo task (`models.tasks`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import html
import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError
from tqdm import tqdm

from llmflow.admin import read_partitions
from llmflow.demo import format_rows, percentile
from llmflow.replay import REPLAYED_AT, namespace_settings, settings_of
from llmflow.reports import figure, write_report
from models.tasks import SIZES, Difficulty, Item, Task, check
from schemas.messages import LLMRequest, LLMResponse, Status
from topology.settings import Settings

ADD = re.compile(r"add (\d+)\+(\d+)=$")
WORD = re.compile(r"(reverse|sort) ([a-z]+)=$")
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


def _difficulty(task: Task, size: int) -> Difficulty:
    """The difficulty whose sizes hold `size` (the generator's own ranges)."""
    low, _ = SIZES[(task, "hard")]
    return "hard" if size >= low else "easy"


def task_item(prompt: str) -> Item | None:
    """The zoo task a prompt asks, with its one right answer; None for other prompts."""
    text = prompt.strip()
    if match := ADD.fullmatch(text):
        a, b = match.group(1), match.group(2)
        size = max(len(a), len(b))
        return Item("add", _difficulty("add", size), text, str(int(a) + int(b)))
    if match := WORD.fullmatch(text):
        task: Task = "reverse" if match.group(1) == "reverse" else "sort"
        word = match.group(2)
        answer = word[::-1] if task == "reverse" else "".join(sorted(word))
        return Item(task, _difficulty(task, len(word)), text, answer)
    return None


@dataclass
class Run:
    """One namespace's requests by id and the first answer to each."""

    namespace: str
    requests: dict[str, LLMRequest] = field(default_factory=dict)
    responses: dict[str, LLMResponse] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)

    def add_request(self, raw: bytes) -> None:
        try:
            request = LLMRequest.model_validate_json(raw)
        except ValidationError:
            return
        self.requests.setdefault(request.id, request)

    def add_response(self, raw: bytes) -> None:
        try:
            response = LLMResponse.model_validate_json(raw)
        except ValidationError:
            return
        if response.id in self.responses:
            self.duplicates[response.id] += 1
        else:
            self.responses[response.id] = response


def sent_at(request: LLMRequest) -> float:
    replayed = request.metadata.get(REPLAYED_AT)
    return float(replayed) if replayed is not None else request.created_at


@dataclass
class Summary:
    """What one run did with a set of request ids."""

    namespace: str
    requests: int = 0
    answered: int = 0
    missing: int = 0
    duplicate_answers: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    latency_from_replay: int = 0
    cache_hit_rate: float = 0.0
    cache_kinds: dict[str, int] = field(default_factory=dict)
    merge_rate: float = 0.0
    checkable: int = 0
    correct: int = 0
    accuracy: float | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["latencies_ms"]
        return values


def summarise(run: Run, ids: Iterable[str]) -> Summary:
    summary = Summary(run.namespace)
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    models: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for request_id in ids:
        request = run.requests.get(request_id)
        if request is None:
            continue
        summary.requests += 1
        summary.duplicate_answers += run.duplicates[request_id]
        response = run.responses.get(request_id)
        if response is None:
            summary.missing += 1
            continue
        summary.answered += 1
        status[response.status.value] += 1
        if response.error is not None:
            errors[response.error.code.value] += 1
        models[response.model or "none"] += 1
        if response.status is Status.CACHED:
            kinds[response.cache_kind or "exact"] += 1
        summary.cost_usd += response.cost_usd
        summary.latencies_ms.append((response.created_at - sent_at(request)) * 1000.0)
        summary.latency_from_replay += REPLAYED_AT in request.metadata
        prompt = request.last_user_turn()
        item = None if prompt is None else task_item(prompt)
        if item is not None:
            summary.checkable += 1
            summary.correct += response.error is None and check(item, response.output or "")
    summary.status, summary.errors = dict(status), dict(errors)
    summary.models, summary.cache_kinds = dict(models), dict(kinds)
    summary.cost_usd = round(summary.cost_usd, 8)
    summary.latency_ms = {
        name: round(percentile(summary.latencies_ms, q), 1) if summary.latencies_ms else None
        for name, q in QUANTILES.items()
    }
    if summary.answered:
        summary.cache_hit_rate = round(status[Status.CACHED.value] / summary.answered, 4)
        summary.merge_rate = round(status[Status.MERGED.value] / summary.answered, 4)
    if summary.checkable:
        summary.accuracy = round(summary.correct / summary.checkable, 4)
    return summary


@dataclass
class Comparison:
    baseline: Summary
    candidate: Summary
    compared: int
    same_answer: int
    both_answered: int

    def report(self) -> dict[str, Any]:
        return {
            "compared_ids": self.compared,
            "both_answered": self.both_answered,
            "same_answer": self.same_answer,
            "baseline": self.baseline.as_dict(),
            "candidate": self.candidate.as_dict(),
        }


def compare(baseline: Run, candidate: Run) -> Comparison:
    """Both runs on the candidate's request ids (those the baseline also holds)."""
    ids = [i for i in candidate.requests if i in baseline.requests]
    answered = [
        i
        for i in ids
        if i in baseline.responses
        and i in candidate.responses
        and baseline.responses[i].error is None
        and candidate.responses[i].error is None
    ]
    same = sum(baseline.responses[i].output == candidate.responses[i].output for i in answered)
    return Comparison(
        summarise(baseline, ids), summarise(candidate, ids), len(ids), same, len(answered)
    )


def rows(comparison: Comparison) -> list[tuple[str, str, str]]:
    """The table's rows: a metric, then the baseline's and the candidate's value."""
    b, c = comparison.baseline, comparison.candidate

    def both(name: str, pick: Any) -> tuple[str, str, str]:
        return (name, str(pick(b)), str(pick(c)))

    table = [
        ("namespace", b.namespace, c.namespace),
        both("requests", lambda s: s.requests),
        both("answered", lambda s: s.answered),
        both("missing", lambda s: s.missing),
        both("duplicate answers", lambda s: s.duplicate_answers),
        both("cost usd", lambda s: f"{s.cost_usd:.6f}"),
        *(both(f"latency {q} ms", lambda s, q=q: s.latency_ms.get(q)) for q in QUANTILES),
        both("cache hit rate", lambda s: f"{s.cache_hit_rate:.1%}"),
        *(
            both(f"  cached {kind}", lambda s, kind=kind: s.cache_kinds.get(kind, 0))
            for kind in sorted({*b.cache_kinds, *c.cache_kinds})
        ),
        both("merge rate", lambda s: f"{s.merge_rate:.1%}"),
        *(
            both(f"status {name}", lambda s, name=name: s.status.get(name, 0))
            for name in sorted({*b.status, *c.status})
        ),
        *(
            both(f"error {name}", lambda s, name=name: s.errors.get(name, 0))
            for name in sorted({*b.errors, *c.errors})
        ),
        *(
            both(f"model {name}", lambda s, name=name: s.models.get(name, 0))
            for name in sorted({*b.models, *c.models})
        ),
        both("checkable (zoo tasks)", lambda s: s.checkable),
        both("correct", lambda s: s.correct),
        both("accuracy", lambda s: "n/a" if s.accuracy is None else f"{s.accuracy:.1%}"),
    ]
    table.append(("same answer", f"{comparison.same_answer} of {comparison.both_answered}", ""))
    return table


@contextlib.contextmanager
def png(images: dict[str, str], name: str, *grid: int, **options: Any) -> Iterator[Any]:
    """Draw on the axes given, then keep the figure in `images[name]` as a base64 PNG."""
    buffer = io.BytesIO()
    with figure(buffer, *grid, dpi=100, **options) as axes:
        yield axes
    images[name] = base64.b64encode(buffer.getvalue()).decode()


def plots(comparison: Comparison) -> dict[str, str]:
    """Latency CDFs, the routing mix and the cost of both runs, as base64 PNGs."""
    runs = (comparison.baseline, comparison.candidate)
    images: dict[str, str] = {}
    with png(images, "latency CDF", figsize=(6, 4)) as axes:
        for summary in runs:
            ordered = sorted(summary.latencies_ms)
            shares = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axes.step(ordered, shares, where="post", label=summary.namespace)
        axes.set(xlabel="latency ms", ylabel="share answered", title="latency CDF")
        axes.legend()

    models = sorted({*comparison.baseline.models, *comparison.candidate.models})
    with png(images, "routing mix", figsize=(6, 4)) as axes:
        width = 0.4
        for offset, summary in enumerate(runs):
            positions = [i + (offset - 0.5) * width for i in range(len(models))]
            counts = [summary.models.get(m, 0) for m in models]
            axes.bar(positions, counts, width, label=summary.namespace)
        axes.set_xticks(range(len(models)), models)
        axes.set(ylabel="answers", title="routing mix (model per answer)")
        axes.legend()

    with png(images, "cost", figsize=(4, 4)) as axes:
        axes.bar([s.namespace for s in runs], [s.cost_usd for s in runs], color=["C0", "C1"])
        axes.set(ylabel="usd", title="cost")
    return images


def render_html(comparison: Comparison) -> str:
    """One self-contained page: the table and the plots embedded as base64 PNGs."""
    cells = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
        for row in rows(comparison)
    )
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in plots(comparison).items()
    )
    title = f"{comparison.baseline.namespace} vs {comparison.candidate.namespace}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llmflow evaluate: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>llmflow evaluate: {html.escape(title)}</h1>
<p>{comparison.compared} request ids compared. Latency runs from when a request was sent
(replayed_at for a replayed request) to its answer; accuracy counts the zoo task prompts,
whose answers are checkable.</p>
<table><tr><th>metric</th><th>baseline</th><th>candidate</th></tr>
{cells}
</table>
{figures}
</body></html>
"""


async def load_run(settings: Settings, namespace: str, progress: bool = True) -> Run:
    """Everything a namespace's request and response topics hold now."""
    scoped = namespace_settings(settings, namespace)
    run = Run(namespace)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        await consumer.topics()
        topics = (scoped.topics.requests.name, scoped.topics.responses.name)
        partitions = {
            topic: [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            for topic in topics
        }
        if not partitions[topics[0]]:
            raise ValueError(f"namespace {namespace!r}: no topic {topics[0]!r} on the brokers")
    finally:
        await consumer.stop()
    for topic, add in zip(topics, (run.add_request, run.add_response), strict=True):
        with tqdm(desc=f"reading {topic}", unit="record", disable=not progress) as bar:
            records = await read_partitions(
                settings.bootstrap_servers, partitions[topic], progress=bar.update
            )
        for record in records:
            add(record.value or b"")
    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", default="live", help="namespace, or live (the default)")
    parser.add_argument("--candidate", required=True, help="the shadow namespace replayed into")
    parser.add_argument("--bootstrap")
    parser.add_argument("--json", default="out/eval.json")
    parser.add_argument("--html", default="out/eval.html")


async def evaluate(settings: Settings, baseline: str, candidate: str) -> Comparison:
    return compare(await load_run(settings, baseline), await load_run(settings, candidate))


def run(args: argparse.Namespace) -> int:
    comparison = asyncio.run(evaluate(settings_of(args), args.baseline, args.candidate))
    print(format_rows([(name, f"{b:>12}  {c}") for name, b, c in rows(comparison)]))

    def draw(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(comparison))

    write_report(comparison.report(), args.json, args.html, draw)
    return 0 if comparison.compared else 1

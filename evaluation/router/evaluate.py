"""`llmflow eval-router`: accuracy and cost of routing policies on checkable zoo tasks.

Every policy answers every task item through the stages' own code, in-process: the route
stage's `Router` (classifier, thresholds, cascade escalation), the infer stage's
`InferenceRunner` over the local ONNX decoder backend (which samples and votes for an
ensemble), and postprocess's escalation and `finish`. An answer is right when
`models.tasks.check` says so; cost is what the results bill (escalations and ensemble
samples included). Policies: always-small, always-large, random (a fair coin between the
two), the quality router at several thresholds, the cascade at several confidences,
self-consistency (the ensemble policy with no escalation: the weighted vote stands) and
ensemble+escalate (the stronger model answers when the vote is below
`route.ensemble_agreement`).

The held-aside mix is the zoo's task generator at seed 2 on the held-out split: the
classifier trained on train-split items at seed 0 (and was scored on held-out items at
seed 1), so none of these items were seen in training. A task file holds one item a line
as JSON, the fields of `models.tasks.Item` (task, difficulty, prompt, answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.infer import InferenceRunner
from agents.postprocess import finish
from agents.preprocess import count_tokens
from agents.route import Router
from inference.complexity import ComplexityClassifier
from llmflow.reports import figure, write_report
from models.tasks import DIFFICULTIES, TASKS, Item, check, make_items
from schemas.messages import ChatMessage, Envelope, GenerationParams, LLMRequest, Role
from streams.drivers.local_decoder import LocalDecoderBackend
from topology.settings import RoutePolicy, Settings, load_settings

HELD_ASIDE_SEED = 2
ITEMS_PER_CELL = 100
MAX_TOKENS = 16
THRESHOLDS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
CASCADE_CONFIDENCES = (0.5, 0.7, 0.8, 0.9, 0.95)
RANDOM_SEED = 0
TARGET_ACCURACY_SHARE = 0.99  # of always-large's accuracy
TARGET_COST_SHARE = 0.40  # of always-large's cost


def held_aside_mix(per_cell: int = ITEMS_PER_CELL) -> list[Item]:
    """Every task and difficulty alike, from items the classifier never trained on."""
    return [
        item
        for task in TASKS
        for difficulty in DIFFICULTIES
        for item in make_items(task, difficulty, per_cell, HELD_ASIDE_SEED, "heldout")
    ]


def load_items(path: Path) -> list[Item]:
    return [Item(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def write_items(items: Iterable[Item], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(item)) + "\n" for item in items))


def envelope_of(
    item: Item, index: int, hint: str | None = None, temperature: float = 0.0, seed: int = 0
) -> Envelope:
    """The item as a request the way preprocess hands it on (its token count set); route
    has yet to set its model."""
    request = LLMRequest(
        id=f"item-{index}",
        tenant="eval",
        model=hint,
        messages=[ChatMessage(role=Role.USER, content=item.prompt)],
        params=GenerationParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed),
    )
    return Envelope(request=request, prompt_tokens=count_tokens(item.prompt))


@dataclass
class Outcome:
    right: bool
    cost_usd: float
    models: list[str]  # every model that was called for the item, in order


def summary(name: str, items: Sequence[Item], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    calls = Counter(model for o in outcomes for model in o.models)
    by_cell: dict[str, list[bool]] = {}
    for item, outcome in zip(items, outcomes, strict=True):
        by_cell.setdefault(f"{item.task}/{item.difficulty}", []).append(outcome.right)
    return {
        "name": name,
        "accuracy": sum(o.right for o in outcomes) / len(outcomes),
        "cost": sum(o.cost_usd for o in outcomes),
        "calls": dict(sorted(calls.items())),
        "accuracy_by_cell": {cell: sum(r) / len(r) for cell, r in by_cell.items()},
    }


class RouterEvaluation:
    """The stages' router, runner and postprocess over one list of items."""

    def __init__(self, settings: Settings, items: Sequence[Item]) -> None:
        if settings.route.classifier is None:
            raise ValueError("eval-router needs route.classifier: it evaluates the classifier")
        self.settings = settings
        self.items = items
        self.classifier = ComplexityClassifier(Path(settings.route.classifier), "cpu")
        self.backend = LocalDecoderBackend(settings.engine, settings.models)
        self.runner = InferenceRunner(settings, self.backend, seed=RANDOM_SEED)
        self.small, self.large = self.classifier.models[0], self.classifier.models[-1]

    async def close(self) -> None:
        await self.backend.close()

    def router(self, policy: RoutePolicy, **route: float) -> Router:
        update = {"policy": policy, **route}
        settings = self.settings.model_copy(
            update={"route": self.settings.route.model_copy(update=update)}
        )
        return Router(settings, self.classifier, seed=RANDOM_SEED)

    async def routed(self, router: Router, hints: Sequence[str | None]) -> list[Outcome]:
        """Route, answer, and answer again where postprocess would escalate, until it would
        not; then finish, which bills the final answer for what was set aside."""
        envelopes = [
            envelope_of(item, i, hint)
            for i, (item, hint) in enumerate(zip(self.items, hints, strict=True))
        ]
        models: list[list[str]] = [[] for _ in envelopes]
        for envelope in envelopes:
            choice = router.assign(envelope)
            envelope.model, envelope.route_reason = choice.model, choice.reason
        pending = list(range(len(envelopes)))
        while pending:
            for i in pending:
                models[i].append(envelopes[i].model or "none")
            await self.runner.run([envelopes[i] for i in pending])
            pending = [i for i in pending if router.escalate(envelopes[i])]
        return [
            self._outcome(item, e, m)
            for item, e, m in zip(self.items, envelopes, models, strict=True)
        ]

    def _outcome(self, item: Item, envelope: Envelope, models: list[str]) -> Outcome:
        finish(envelope)
        result = envelope.result
        output = result.output if result is not None else None
        cost = result.cost_usd if result is not None else 0.0
        return Outcome(output is not None and check(item, output), cost, models)

    async def policies(self) -> list[dict[str, Any]]:
        coin = random.Random(RANDOM_SEED)
        unhinted: list[str | None] = [None] * len(self.items)
        fixed: dict[str, list[str | None]] = {
            "always-small": [self.small] * len(self.items),
            "always-large": [self.large] * len(self.items),
            "random": [coin.choice((self.small, self.large)) for _ in self.items],
        }
        runs: list[tuple[str, Callable[[], Awaitable[list[Outcome]]]]] = [
            *(
                (name, partial(self.routed, self.router("quality"), hints))
                for name, hints in fixed.items()
            ),
            *(
                (
                    f"router@{t}",
                    partial(self.routed, self.router("quality", quality_threshold=t), unhinted),
                )
                for t in THRESHOLDS
            ),
            *(
                (
                    f"cascade@{c}",
                    partial(self.routed, self.router("cascade", cascade_confidence=c), unhinted),
                )
                for c in CASCADE_CONFIDENCES
            ),
            (
                "self-consistency",
                partial(self.routed, self.router("ensemble", ensemble_agreement=0.0), unhinted),
            ),
            ("ensemble+escalate", partial(self.routed, self.router("ensemble"), unhinted)),
        ]
        rows = [
            summary(name, self.items, await run())
            for name, run in tqdm(runs, desc="policies", unit="policy")
        ]
        large = next(row for row in rows if row["name"] == "always-large")
        for row in rows:
            row["accuracy_share"] = (
                row["accuracy"] / large["accuracy"] if large["accuracy"] else None
            )
            row["cost_share"] = row["cost"] / large["cost"] if large["cost"] else None
            row["meets_target"] = (
                row["accuracy_share"] is not None
                and row["cost_share"] is not None
                and row["accuracy_share"] >= TARGET_ACCURACY_SHARE
                and row["cost_share"] <= TARGET_COST_SHARE
            )
        return rows


async def evaluate(settings: Settings, items: Sequence[Item]) -> list[dict[str, Any]]:
    evaluation = RouterEvaluation(settings, items)
    try:
        return await evaluation.policies()
    finally:
        await evaluation.close()


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'policy':18} {'accuracy':>8} {'cost usd':>11} {'of large: acc':>13} {'cost':>6}  target"
    ]
    for row in rows:
        lines.append(
            f"{row['name']:18} {row['accuracy']:8.4f} {row['cost']:11.3e} "
            f"{row['accuracy_share']:13.4f} {row['cost_share']:6.3f}  "
            f"{'yes' if row['meets_target'] else ''}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against cost (a share of always-large's): the router and cascade sweeps as
    lines, the other policies as points, the target as a shaded corner."""
    with figure(path, dpi=120, figsize=(7, 5)) as axes:
        for prefix in ("router@", "cascade@"):
            sweep = sorted(
                (r for r in rows if r["name"].startswith(prefix)), key=lambda r: r["cost_share"]
            )
            axes.plot(
                [r["cost_share"] for r in sweep],
                [r["accuracy"] for r in sweep],
                marker="o",
                label=prefix.rstrip("@"),
            )
            for row in sweep:
                axes.annotate(
                    row["name"].removeprefix(prefix),
                    (row["cost_share"], row["accuracy"]),
                    fontsize=7,
                )
        for row in rows:
            if "@" not in row["name"]:
                axes.scatter(row["cost_share"], row["accuracy"], marker="s", label=row["name"])
        large = next(r for r in rows if r["name"] == "always-large")
        axes.fill_between(
            [0, TARGET_COST_SHARE],
            large["accuracy"] * TARGET_ACCURACY_SHARE,
            1.0,
            color="green",
            alpha=0.1,
            label="target",
        )
        axes.set(
            xlabel="cost (share of always-large)",
            ylabel="accuracy",
            title="routing policies on zoo tasks",
        )
        axes.legend(fontsize=7)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    items = load_items(Path(args.tasks)) if args.tasks else held_aside_mix()
    rows = asyncio.run(evaluate(settings, items))
    print(table(rows))
    report = {"tasks": args.tasks or "held-aside mix", "items": len(items), "policies": rows}
    write_report(report, args.json, args.plot, lambda path: plot(rows, path))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", help="task items, one JSON object a line (default: held-aside mix)"
    )
    parser.add_argument("--json", required=True, help="where to write the policies table")
    parser.add_argument("--plot", help="where to write a PNG of the cost/accuracy curve")

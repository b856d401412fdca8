"""eval-router: the held-aside mix, the CLI's table, and the target through the real stages."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from evaluation.router.evaluate import (
    HELD_ASIDE_SEED,
    TARGET_ACCURACY_SHARE,
    TARGET_COST_SHARE,
    Outcome,
    RouterEvaluation,
    held_aside_mix,
    load_items,
    write_items,
)
from llmflow.cli import main
from models.tasks import split_of
from topology.settings import ZOO, Settings


def test_the_mix_holds_no_item_the_classifier_trained_or_was_scored_on() -> None:
    items = held_aside_mix()
    card = json.loads((ZOO / "classifier" / "classifier.json").read_text())
    assert HELD_ASIDE_SEED not in card["seeds"].values()
    assert all(split_of(item.prompt) == "heldout" for item in items)
    assert len({(i.task, i.difficulty) for i in items}) == 6


def test_cli_writes_the_policies_of_any_task_file(tmp_path: Path) -> None:
    tasks, out = tmp_path / "tasks.jsonl", tmp_path / "router.json"
    write_items(held_aside_mix(2), tasks)
    assert load_items(tasks) == held_aside_mix(2)
    assert main(["eval-router", "--tasks", str(tasks), "--json", str(out)]) == 0
    policies = {p["name"]: p for p in json.loads(out.read_text())["policies"]}
    assert {"always-small", "always-large", "random", "self-consistency"} <= set(policies)
    assert any(name.startswith("router@") for name in policies)
    assert any(name.startswith("cascade@") for name in policies)
    for policy in policies.values():
        assert 0.0 <= policy["accuracy"] <= 1.0
        assert policy["cost"] > 0.0
    assert policies["always-small"]["cost"] < policies["always-large"]["cost"]


def test_the_default_router_meets_the_target_on_the_mix() -> None:
    """>= 99 % of always-large's accuracy at <= 40 % of its cost, on the real decoders."""

    async def run() -> tuple[list[Outcome], list[Outcome]]:
        evaluation = RouterEvaluation(Settings(), held_aside_mix())
        try:
            hints: list[str | None] = [evaluation.large] * len(evaluation.items)
            large = await evaluation.routed(evaluation.router("quality"), hints)
            routed = await evaluation.routed(
                evaluation.router(Settings().route.policy), [None] * len(evaluation.items)
            )
            return large, routed
        finally:
            await evaluation.close()

    large, routed = asyncio.run(run())
    accuracy = sum(o.right for o in routed) / sum(o.right for o in large)
    cost = sum(o.cost_usd for o in routed) / sum(o.cost_usd for o in large)
    assert accuracy >= TARGET_ACCURACY_SHARE
    assert cost <= TARGET_COST_SHARE

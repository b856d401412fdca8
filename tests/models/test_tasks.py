"""The zoo's tasks: reproducible items, a right checker, and a held-out split apart from train."""

from __future__ import annotations

import pytest

from models.tasks import DIFFICULTIES, SIZES, TASKS, Difficulty, Task, check, make_items, split_of

CELLS = [(task, difficulty) for task in TASKS for difficulty in DIFFICULTIES]


@pytest.mark.parametrize(("task", "difficulty"), CELLS)
def test_items_are_deterministic(task: Task, difficulty: Difficulty) -> None:
    assert make_items(task, difficulty, 50, seed=3) == make_items(task, difficulty, 50, seed=3)
    assert make_items(task, difficulty, 50, seed=3) != make_items(task, difficulty, 50, seed=4)
    assert make_items(task, difficulty, 10, seed=3) == make_items(task, difficulty, 50, seed=3)[:10]


@pytest.mark.parametrize(("task", "difficulty"), CELLS)
def test_answers_are_right_and_sized(task: Task, difficulty: Difficulty) -> None:
    low, high = SIZES[(task, difficulty)]
    for item in make_items(task, difficulty, 200, seed=0):
        assert item.prompt.startswith(f"{task} ") and item.prompt.endswith("=")
        body = item.prompt[len(task) + 1 : -1]
        if task == "add":
            a, b = body.split("+")
            assert all(low <= len(x) <= high for x in (a, b))
            assert int(item.answer) == int(a) + int(b)
        else:
            assert low <= len(body) <= high
            assert item.answer == (body[::-1] if task == "reverse" else "".join(sorted(body)))


def test_checker() -> None:
    item = make_items("add", "easy", 1, seed=0)[0]
    assert check(item, item.answer)
    assert check(item, f" {item.answer}\n")
    assert not check(item, item.answer + "0")
    assert not check(item, "")


@pytest.mark.parametrize(("task", "difficulty"), CELLS)
def test_heldout_never_overlaps_train(task: Task, difficulty: Difficulty) -> None:
    train = {i.prompt for seed in range(5) for i in make_items(task, difficulty, 400, seed)}
    heldout = {i.prompt for i in make_items(task, difficulty, 200, seed=0, split="heldout")}
    assert heldout and train.isdisjoint(heldout)
    assert all(split_of(prompt) == "heldout" for prompt in heldout)

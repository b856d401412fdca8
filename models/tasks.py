"""Checkable toy tasks for the decoder zoo: addition, string reversal and letter sorting.

Every item has one exact answer, so a model's accuracy is measured without a judge. Pure
Python (no torch): the build trains on these items and the runtime and tests score on them.
Train and held-out items come from one fixed split of the prompt space (a hash of the
prompt), so the two never overlap whatever seeds or sizes are asked for.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Literal

Task = Literal["add", "reverse", "sort"]
Difficulty = Literal["easy", "hard"]
Split = Literal["train", "heldout"]

TASKS: tuple[Task, ...] = ("add", "reverse", "sort")
DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "hard")
LETTERS = string.ascii_lowercase
# Every character a prompt or an answer can hold: the character tokenizer's vocabulary.
ALPHABET = string.digits + LETTERS + "+= "

# (smallest, largest) operand digits for addition and word lengths for the letter tasks.
SIZES: dict[tuple[Task, Difficulty], tuple[int, int]] = {
    ("add", "easy"): (1, 2),
    ("add", "hard"): (4, 5),
    ("reverse", "easy"): (3, 5),
    ("reverse", "hard"): (8, 12),
    ("sort", "easy"): (3, 5),
    ("sort", "hard"): (8, 12),
}
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class Item:
    task: Task
    difficulty: Difficulty
    prompt: str
    answer: str


def split_of(prompt: str) -> Split:
    """Which split a prompt belongs to: fixed by its hash, independent of any seed."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _item(task: Task, difficulty: Difficulty, rng: random.Random) -> Item:
    low, high = SIZES[(task, difficulty)]
    if task == "add":
        a = _number(rng, rng.randint(low, high))
        b = _number(rng, rng.randint(low, high))
        return Item(task, difficulty, f"add {a}+{b}=", str(a + b))
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))
    answer = word[::-1] if task == "reverse" else "".join(sorted(word))
    return Item(task, difficulty, f"{task} {word}=", answer)


def make_items(
    task: Task, difficulty: Difficulty, n: int, seed: int, split: Split = "train"
) -> list[Item]:
    """`n` items of one task and difficulty from `split`, the same for the same arguments."""
    rng = random.Random(f"{task}/{difficulty}/{seed}")
    items: list[Item] = []
    while len(items) < n:
        item = _item(task, difficulty, rng)
        if split_of(item.prompt) == split:
            items.append(item)
    return items


def check(item: Item, answer: str) -> bool:
    """Whether a model's answer is right; surrounding whitespace is forgiven."""
    return answer.strip() == item.answer

"""How hard a prompt is for the zoo: a small ONNX classifier over plain prompt features.

`prompt_features` turns a prompt into a fixed vector of explainable counts (length, digits,
operators, task prefix, code and reasoning markers); the classifier built by
`models/classifier.py` maps it to the probability that each zoo model answers correctly.
`complexity` (1 - the cheapest model's chance) is a 0..1 score for the route stage to use.
Feature standardisation lives inside the ONNX graph, so raw features go straight in.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from inference.runtime import Device, ModelLoadError, open_session

Array = np.ndarray[Any, Any]

# Case-sensitive, as the zoo writes them, so a chat "Add a button ..." is not a task.
TASK_PREFIXES = ("add ", "reverse ", "sort ")


OPERATORS = frozenset("+-*/=<>^%&|")
CODE_MARKERS = ("`", "def ", "class ", "import ", "return ", "{", ";", "()")
REASONING_MARKERS = ("step by step", "prove", "why", "explain", "derive", "reason")
DIGIT_RUN = re.compile(r"\d+")
LETTER_RUN = re.compile(r"[^\W\d_]+")


def task_type(prompt: str) -> str:
    """The zoo task a prompt asks for, or `chat`."""
    return next((p.strip() for p in TASK_PREFIXES if prompt.startswith(p)), "chat")


# Counts that grow with the prompt are log1p-scaled so a very long chat prompt stays in range.
FEATURE_NAMES = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_digits",
    "log_letters",
    "log_operators",
    "log_numbers",
    "log_longest_digit_run",
    "log_longest_letter_run",
    "letter_share",
    "digit_share",
    "space_share",
    "non_ascii_share",
    "task_add",
    "task_reverse",
    "task_sort",
    "task_none",
    "code_markers",
    "reasoning_markers",
    "log_question_marks",
)


def _longest(pattern: re.Pattern[str], text: str) -> int:
    return max((len(match) for match in pattern.findall(text)), default=0)


def prompt_features(text: str) -> Array:
    """The prompt's feature vector (float32, one value per FEATURE_NAMES entry)."""
    chars = len(text)
    share = 1 / max(chars, 1)
    digits = sum(c.isdigit() for c in text)
    letters = sum(c.isalpha() for c in text)
    lowered = text.lower()
    task = [text.startswith(prefix) for prefix in TASK_PREFIXES]
    values = [
        math.log1p(chars),
        math.log1p(len(text.split())),
        math.log1p(text.count("\n") + 1 if text else 0),
        math.log1p(digits),
        math.log1p(letters),
        math.log1p(sum(c in OPERATORS for c in text)),
        math.log1p(len(DIGIT_RUN.findall(text))),
        math.log1p(_longest(DIGIT_RUN, text)),
        math.log1p(_longest(LETTER_RUN, text)),
        letters * share,
        digits * share,
        sum(c.isspace() for c in text) * share,
        sum(not c.isascii() for c in text) * share,
        *task,
        not any(task),
        sum(marker in lowered for marker in CODE_MARKERS),
        sum(marker in lowered for marker in REASONING_MARKERS),
        math.log1p(text.count("?")),
    ]
    return np.array(values, dtype=np.float32)


def features(prompts: list[str]) -> Array:
    """Feature rows for a batch of prompts: float32 [len(prompts), F]."""
    rows = [prompt_features(p) for p in prompts]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)), np.float32)


def roc_auc(scores: Array, truth: Array) -> float | None:
    """ROC AUC by the rank-sum formula, ties sharing ranks; None when one class is absent."""
    right = np.asarray(truth) == 1
    positives, negatives = int(right.sum()), int((~right).sum())
    if positives == 0 or negatives == 0:
        return None
    _, inverse = np.unique(np.asarray(scores), return_inverse=True)
    counts = np.bincount(inverse)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each value
    rank_sum = float(mean_rank[inverse][right].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


class ComplexityClassifier:
    """model.onnx (features -> p_correct per model) and classifier.json (names, metrics)."""

    def __init__(self, folder: Path, device: Device = "auto") -> None:
        meta_path = folder / "classifier.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
            self.models: list[str] = list(self.meta["models"])
            names: list[str] = list(self.meta["features"])
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{meta_path} does not exist; run `make models`") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{meta_path} is not a valid classifier card: {exc!r}") from exc
        if tuple(names) != FEATURE_NAMES:
            raise ModelLoadError(
                f"{meta_path} was built for {len(names)} features {names}, but this runtime "
                f"computes {len(FEATURE_NAMES)} {list(FEATURE_NAMES)}; rebuild the classifier"
            )
        if not self.models:
            raise ModelLoadError(f"{meta_path} names no models")
        model_path = folder / "model.onnx"
        self.session = open_session(model_path, device, intra_op_threads=1)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        width, count = inputs[0].shape[-1], outputs[0].shape[-1]
        if width != len(FEATURE_NAMES) or count != len(self.models):
            raise ModelLoadError(
                f"{model_path} takes {width} features and gives {count} outputs; "
                f"{meta_path} says {len(FEATURE_NAMES)} and {len(self.models)}"
            )
        self.input_name = inputs[0].name

    def predict(self, prompts: list[str]) -> dict[str, Array]:
        """Per model name, the probability that it answers each prompt correctly."""
        if not prompts:
            return {name: np.zeros(0, np.float32) for name in self.models}
        (p_correct,) = self.session.run(None, {self.input_name: features(prompts)})
        return {name: p_correct[:, i] for i, name in enumerate(self.models)}

    def complexity(self, prompts: list[str]) -> Array:
        """1 - the cheapest (first) model's chance of being right: 0 easy, 1 hard."""
        result: Array = 1.0 - self.predict(prompts)[self.models[0]]
        return result

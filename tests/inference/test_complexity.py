"""The complexity classifier against the committed artifact and the real zoo engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.complexity import (
    FEATURE_NAMES,
    ComplexityClassifier,
    prompt_features,
    roc_auc,
    task_type,
)
from inference.decoder import DecoderModel, SamplingParams
from inference.runtime import ModelLoadError
from models.tasks import DIFFICULTIES, TASKS, check, make_items
from models.zoo import ARTIFACTS

FOLDER = ARTIFACTS / "classifier"
ODD = [
    "",
    " ",
    "\n\n\t",
    "ünïcödé 🙂 数学 ½",
    "add 99999+99999=",
    "Why? Explain step by step: ```def f(x): return x*2```",
    "x" * 200_000,
    "7" * 50_000 + "\n" * 1000,
]


@pytest.fixture(scope="module")
def classifier() -> ComplexityClassifier:
    return ComplexityClassifier(FOLDER, device="cpu")


def test_features_are_fixed_deterministic_and_finite() -> None:
    for text in ODD:
        first, again = prompt_features(text), prompt_features(text)
        assert first.dtype == np.float32
        assert first.shape == (len(FEATURE_NAMES),)
        assert np.isfinite(first).all()
        np.testing.assert_array_equal(first, again)


def test_task_prefix_is_one_hot() -> None:
    names = list(FEATURE_NAMES)
    tasks = ["task_add", "task_reverse", "task_sort", "task_none"]
    cases = [("add 1+2=", "task_add"), ("sort cab=", "task_sort"), ("hello", "task_none")]
    for text, want in cases:
        values = prompt_features(text)
        assert [values[names.index(t)] for t in tasks] == [float(t == want) for t in tasks]


def test_roc_auc_matches_hand_counts() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert roc_auc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_predict_shapes_and_range(classifier: ComplexityClassifier) -> None:
    prompts = ODD[:5]
    predicted = classifier.predict(prompts)
    assert list(predicted) == classifier.models
    for p in predicted.values():
        assert p.shape == (len(prompts),)
        assert ((p >= 0) & (p <= 1)).all()
    score = classifier.complexity(prompts)
    np.testing.assert_allclose(score, 1 - predicted[classifier.models[0]], atol=1e-6)
    assert classifier.predict([])[classifier.models[0]].shape == (0,)


def test_hard_addition_scores_more_complex(classifier: ComplexityClassifier) -> None:
    easy, hard = (
        [i.prompt for i in make_items("add", d, 50, seed=7, split="heldout")]
        for d in ("easy", "hard")
    )
    assert classifier.complexity(hard).mean() > classifier.complexity(easy).mean() + 0.2


def test_chat_prompts_are_beyond_the_zoo(classifier: ComplexityClassifier) -> None:
    chat = [
        "add a dark mode toggle to my React app",
        "Why is the sky blue? Explain step by step.",
        "Write a Python function that parses ISO dates.",
    ]
    assert (classifier.complexity(chat) > 0.9).all()


def test_probabilities_rank_the_cheapest_models_answers(classifier: ComplexityClassifier) -> None:
    """AUC of the predicted chance against what zoo-small really answers, held-out items."""
    items = [
        item
        for task in TASKS
        for difficulty in DIFFICULTIES
        for item in make_items(task, difficulty, 25, seed=7, split="heldout")
    ]
    engine = DecoderModel(ARTIFACTS / "zoo-small", device="cpu", intra_op_threads=1)
    prompts = [item.prompt for item in items]
    outputs = engine.generate(prompts, [SamplingParams(max_tokens=16)] * len(items))
    right = np.array([check(i, o.text) for i, o in zip(items, outputs, strict=True)])
    area = roc_auc(classifier.predict(prompts)["zoo-small"], right)
    assert area is not None and area >= 0.7


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    folder = tmp_path / "classifier"
    shutil.copytree(FOLDER, folder)
    return folder


def test_missing_model_file_names_it(copy: Path) -> None:
    (copy / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        ComplexityClassifier(copy, device="cpu")


def test_corrupt_model_file_names_it(copy: Path) -> None:
    (copy / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        ComplexityClassifier(copy, device="cpu")


@pytest.mark.parametrize("text", ["{not json", "{}"])
def test_corrupt_card_names_it(copy: Path, text: str) -> None:
    (copy / "classifier.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"classifier\.json"):
        ComplexityClassifier(copy, device="cpu")


def test_feature_mismatch_is_refused(copy: Path) -> None:
    card = json.loads((copy / "classifier.json").read_text())
    card["features"] = card["features"][:-1]
    (copy / "classifier.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="features"):
        ComplexityClassifier(copy, device="cpu")


def test_task_type_is_the_zoo_task_or_chat() -> None:
    assert [task_type(p) for p in ("add 1+2=", "sort cab=", "Add a button")] == [
        "add",
        "sort",
        "chat",
    ]

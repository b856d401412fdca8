"""The complexity classifier: which zoo model answers a prompt correctly, from its features.

Run in the build venv: `PYTHONPATH=. .venv-build/bin/python -m models.classifier`.
Labels come from the zoo itself: every zoo model answers train-split task items greedily
through the ONNX engine and `check` scores the answer, so the classifier learns what the
served models really get right. A small MLP with one sigmoid per model is trained on the
features of `inference.complexity`, with the standardisation baked into the exported graph,
and scored (AUC, accuracy) on held-out items labelled the same way. Real chat prompts
(ShareGPT first turns) join the data labelled wrong for every zoo model: the zoo only knows
the checkable tasks, so the route stage must not send it chat. Re-run it whenever a zoo model
changes: it always relabels and retrains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from inference.complexity import FEATURE_NAMES, features, roc_auc
from inference.decoder import DecoderModel, SamplingParams
from llmflow.prompts import load_prompts
from models.tasks import DIFFICULTIES, TASKS, Item, Split, check, make_items, split_of
from models.zoo import ARTIFACTS, digest
from topology.settings import Settings

FOLDER = ARTIFACTS / "classifier"
TRAIN_PER_CELL = 1000
HELDOUT_PER_CELL = 200
CHAT_PROMPTS = 1000
TRAIN_SEED = 0
HELDOUT_SEED = 1
BATCH = 200
HIDDEN = 32
EPOCHS = 400
LR = 1e-2
SEED = 0
OPSET = 17


def zoo_models() -> list[tuple[str, Path]]:
    """The local zoo models from the settings, cheapest first (the order of the outputs)."""
    local = [m for m in Settings().models if m.backend == "onnx" and m.path]
    return [(m.name, Path(str(m.path))) for m in sorted(local, key=lambda m: m.input_per_1k)]


def task_items(per_cell: int, seed: int, split: Split) -> list[Item]:
    return [
        item
        for task in TASKS
        for difficulty in DIFFICULTIES
        for item in make_items(task, difficulty, per_cell, seed, split)
    ]


def labels(folder: Path, items: list[Item], desc: str) -> np.ndarray[Any, Any]:
    """1.0 where the model's greedy answer is right, through the same engine that serves it."""
    engine = DecoderModel(folder, device="cpu", intra_op_threads=1)
    right: list[bool] = []
    for start in tqdm(range(0, len(items), BATCH), desc=desc):
        chunk = items[start : start + BATCH]
        outputs = engine.generate(
            [i.prompt for i in chunk], [SamplingParams(max_tokens=16)] * len(chunk)
        )
        right += [check(item, out.text) for item, out in zip(chunk, outputs, strict=True)]
    return np.array(right, dtype=np.float32)


class Classifier(nn.Module):
    """Standardise, two hidden layers, one sigmoid per model."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor, outputs: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(
            nn.Linear(len(mean), HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, outputs),
        )

    def logits(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x))


def train(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> Classifier:
    """Full-batch Adam on binary cross-entropy; fixed seed, so the same data gives one model."""
    torch.manual_seed(SEED)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    std = inputs.std(dim=0)
    model = Classifier(
        inputs.mean(dim=0), torch.where(std > 1e-6, std, torch.ones_like(std)), y.shape[1]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    progress = tqdm(range(EPOCHS), desc="classifier")
    for epoch in progress:
        loss = loss_fn(model.logits(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def export(model: Classifier, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(2, len(FEATURE_NAMES)),),
            str(path),
            input_names=["features"],
            output_names=["p_correct"],
            dynamic_axes={"features": {0: "batch"}, "p_correct": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def main() -> None:
    torch.set_num_threads(1)
    started = time.monotonic()
    zoo = zoo_models()
    train_items = task_items(TRAIN_PER_CELL, TRAIN_SEED, "train")
    heldout_items = task_items(HELDOUT_PER_CELL, HELDOUT_SEED, "heldout")
    chat = load_prompts(CHAT_PROMPTS)
    chat_train = [p for p in chat if split_of(p) == "train"]
    chat_heldout = [p for p in chat if split_of(p) == "heldout"]
    y_tasks = np.stack([labels(path, train_items, f"{name} train") for name, path in zoo], axis=1)
    y_heldout = np.stack(
        [labels(path, heldout_items, f"{name} heldout") for name, path in zoo], axis=1
    )
    x_train = features([i.prompt for i in train_items] + chat_train)
    y_train = np.concatenate([y_tasks, np.zeros((len(chat_train), len(zoo)), np.float32)])
    model = train(x_train, y_train)
    FOLDER.mkdir(parents=True, exist_ok=True)
    export(model, FOLDER / "model.onnx")

    with torch.no_grad():
        p = model(torch.from_numpy(features([i.prompt for i in heldout_items]))).numpy()
        p_chat = model(torch.from_numpy(features(chat_heldout))).numpy()
    metrics: dict[str, dict[str, float | None]] = {}
    for k, (name, _) in enumerate(zoo):
        area = roc_auc(p[:, k], y_heldout[:, k])
        metrics[name] = {
            "auc": None if area is None else round(area, 4),
            "accuracy": round(float(((p[:, k] > 0.5) == (y_heldout[:, k] == 1)).mean()), 4),
            "base_rate": round(float(y_heldout[:, k].mean()), 4),
            "chat_mean_p": round(float(p_chat[:, k].mean()), 4),
        }
    card = {
        "models": [name for name, _ in zoo],
        "features": list(FEATURE_NAMES),
        "train_size": {"task_items": len(train_items), "chat_prompts": len(chat_train)},
        "heldout_size": {"task_items": len(heldout_items), "chat_prompts": len(chat_heldout)},
        "items_per_cell": {"train": TRAIN_PER_CELL, "heldout": HELDOUT_PER_CELL},
        "seeds": {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "torch": SEED},
        "heldout": metrics,
        "zoo_model_sha256": {name: digest(path / "model.onnx") for name, path in zoo},
    }
    (FOLDER / "classifier.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("train_size", "heldout_size", "heldout")}, indent=2))
    print(f"classifier: built in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()

"""The decoder zoo: tiny GPT-style decoders trained on the checkable tasks, exported to ONNX.

Run in the build venv: `PYTHONPATH=. .venv-build/bin/python -m models.decoders [--force]`.
The exported graphs use the Hugging Face Optimum decoder names (input_ids, attention_mask,
position_ids, past_key_values.N.key/value -> logits, present.N.key/value) and the folders
carry an HF-style config.json and tokenizer.json, so the engine treats them exactly like a
user's `optimum-cli` export. A model whose artifacts already match its spec is not retrained.
The card's accuracies are measured through the ONNX engine, the way the pipeline serves it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor, nn
from tqdm import tqdm

from models.tasks import ALPHABET, DIFFICULTIES, TASKS, Item, check, make_items
from models.zoo import ARTIFACTS

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS = 0, 1, 2
VOCAB = {token: i for i, token in enumerate([*SPECIALS, *ALPHABET])}
MAX_POSITIONS = 48
NEG = -1e9  # a finite "minus infinity": fully masked (padding) rows stay free of NaN
OPSET = 17
KV = ("key", "value")
# Price model: USD per FLOP of forward compute, the one constant behind card.json's price.
USD_PER_FLOP = 1e-13
HELDOUT_PER_CELL = 200
HELDOUT_SEED = 0


@dataclass(frozen=True)
class Spec:
    """One zoo model: its shape and how it is trained (the cache key of its artifacts)."""

    name: str
    layers: int
    hidden: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    seed: int


SPECS = (
    Spec("zoo-small", layers=2, hidden=64, heads=4, steps=6000, batch_size=96, lr=3e-3, seed=1),
    Spec("zoo-large", layers=4, hidden=128, heads=4, steps=7000, batch_size=96, lr=2e-3, seed=2),
)


def build_tokenizer() -> Tokenizer:
    """Character-level: one token per character, <bos> prepended, decode adds no spaces."""
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    return tokenizer


class Block(nn.Module):
    """Pre-LN transformer block; attention extends a key/value cache and honours the mask."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )

    def forward(
        self, x: Tensor, allowed: Tensor, past_key: Tensor, past_value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(hidden, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        scores = (q @ key.transpose(2, 3)) / math.sqrt(head_dim)
        scores = torch.where(allowed, scores, torch.full_like(scores, NEG))
        attended = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, seq, hidden)
        x = x + self.proj(attended)
        return x + self.mlp(self.ln2(x)), key, value


class Decoder(nn.Module):
    """GPT-style decoder with learned positions, read by the Optimum-style signature."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.tokens = nn.Embedding(len(VOCAB), spec.hidden)
        self.positions = nn.Embedding(MAX_POSITIONS, spec.hidden)
        self.blocks = nn.ModuleList(Block(spec.hidden, spec.heads) for _ in range(spec.layers))
        self.ln = nn.LayerNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, len(VOCAB), bias=False)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        """Logits and the presents; `past` is key, value per layer, `[b, heads, past, dim]`.

        Query i sits at cache column total - seq + i and sees columns up to that one whose
        attention_mask is 1, so left padding and merged caches are masked exactly.
        """
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        columns = torch.arange(total, device=input_ids.device)
        rows = columns[total - seq :]
        causal = columns.unsqueeze(0) <= rows.unsqueeze(1)
        allowed = causal.unsqueeze(0).unsqueeze(0) & (attention_mask > 0)[:, None, None, :]
        x = self.tokens(input_ids) + self.positions(position_ids)
        presents: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, allowed, past[2 * i], past[2 * i + 1])
            presents += [key, value]
        return (self.head(self.ln(x)), *presents)


def encode_item(item: Item) -> tuple[list[int], int]:
    """Token ids of bos + prompt + answer + eos, and where the answer starts."""
    prompt = [BOS, *(VOCAB[c] for c in item.prompt)]
    return [*prompt, *(VOCAB[c] for c in item.answer), EOS], len(prompt)


def training_batch(step: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs, targets and a loss mask over the answer tokens for one mixed batch."""
    cells = [(t, d) for t in TASKS for d in DIFFICULTIES]
    items = [
        item
        for i, (task, difficulty) in enumerate(cells)
        for item in make_items(task, difficulty, size // len(cells), seed=step * 1000 + i)
    ]
    encoded = [encode_item(item) for item in items]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    weight = torch.zeros(len(items), width - 1)
    for row, (tokens, start) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        weight[row, start - 1 : len(tokens) - 1] = 1.0
    return ids[:, :-1], ids[:, 1:], weight


def empty_past(spec: Spec, batch: int) -> list[Tensor]:
    head_dim = spec.hidden // spec.heads
    return [torch.zeros(batch, spec.heads, 0, head_dim) for _ in range(2 * spec.layers)]


def train(spec: Spec) -> Decoder:
    """AdamW with warm-up and cosine decay; loss only on the answer tokens."""
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    model = Decoder(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = 100

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (spec.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    progress = tqdm(range(spec.steps), desc=spec.name)
    for step in progress:
        inputs, targets, weight = training_batch(spec.seed * 1_000_000 + step, spec.batch_size)
        batch, seq = inputs.shape
        positions = torch.arange(seq).expand(batch, seq)
        logits = model(inputs, torch.ones(batch, seq), positions, *empty_past(spec, batch))[0]
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (losses * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def export(model: Decoder, folder: Path) -> None:
    """model.onnx with dynamic batch, sequence and past axes; one graph for prefill and decode."""
    spec = model.spec
    batch, seq, past_len = 2, 3, 4
    past = [t.new_zeros(batch, spec.heads, past_len, t.shape[3]) for t in empty_past(spec, 1)]
    args = (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq).expand(batch, seq),
        *past,
    )
    past_names = [f"past_key_values.{i}.{kind}" for i in range(spec.layers) for kind in KV]
    present_names = [f"present.{i}.{kind}" for i in range(spec.layers) for kind in KV]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names}
    axes |= {
        name: {0: "batch_size", 2: "past_sequence_length + sequence_length"}
        for name in present_names
    }
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(folder / "model.onnx"),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def hf_config(spec: Spec) -> dict[str, Any]:
    """config.json as Hugging Face writes it, plus the training spec that keys the cache."""
    return {
        "model_type": "llmflow_zoo",
        "architectures": ["ZooDecoder"],
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
        "hidden_size": spec.hidden,
        "head_dim": spec.hidden // spec.heads,
        "vocab_size": len(VOCAB),
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
        "training": asdict(spec),
    }


def is_cached(spec: Spec, folder: Path) -> bool:
    config = folder / "config.json"
    if not all((folder / name).is_file() for name in ("model.onnx", "tokenizer.json")):
        return False
    return config.is_file() and json.loads(config.read_text()).get("training") == asdict(spec)


def flops_per_token(model: Decoder) -> tuple[int, int]:
    """(parameters, forward FLOPs per token) by Kaplan et al.'s count.

    2 FLOPs per weight of every matrix product (embedding look-ups are free), plus
    2 * layers * context * hidden for the attention scores and the weighted sum, with the
    context taken at its largest (max_position_embeddings).
    """
    params = sum(p.numel() for p in model.parameters())
    lookups = model.tokens.weight.numel() + model.positions.weight.numel()
    spec = model.spec
    return params, 2 * (params - lookups) + 2 * spec.layers * MAX_POSITIONS * spec.hidden


def heldout_accuracy(folder: Path) -> dict[str, dict[str, float]]:
    """Accuracy per task and difficulty on the held-out items, greedy, through the engine."""
    from inference.decoder import DecoderModel, SamplingParams

    engine = DecoderModel(folder, device="cpu")
    accuracy: dict[str, dict[str, float]] = {}
    for task in TASKS:
        accuracy[task] = {}
        for difficulty in DIFFICULTIES:
            items = make_items(task, difficulty, HELDOUT_PER_CELL, HELDOUT_SEED, "heldout")
            right = 0
            for start in range(0, len(items), 50):
                chunk = items[start : start + 50]
                params = [SamplingParams(max_tokens=16)] * len(chunk)
                outputs = engine.generate([item.prompt for item in chunk], params)
                right += sum(check(i, out.text) for i, out in zip(chunk, outputs, strict=True))
            accuracy[task][difficulty] = round(right / len(items), 4)
    return accuracy


def write_card(spec: Spec, folder: Path, train_seconds: float) -> None:
    """The card without accuracies; `add_accuracy` measures those through the engine."""
    params, flops = flops_per_token(Decoder(spec))
    card = {
        "name": spec.name,
        "parameters": params,
        "flops_per_token": flops,
        "flops_formula": "2*(params - embedding lookups) + 2*layers*context*hidden, context=48",
        "usd_per_flop": USD_PER_FLOP,
        "price_per_1k_tokens_usd": round(flops * 1000 * USD_PER_FLOP, 8),
        "train_seconds": round(train_seconds, 1),
        "heldout": {"seed": HELDOUT_SEED, "items_per_cell": HELDOUT_PER_CELL},
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def add_accuracy(folder: Path) -> None:
    card = json.loads((folder / "card.json").read_text())
    card["accuracy"] = heldout_accuracy(folder)
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


def build(spec: Spec, force: bool) -> None:
    """Train and export unless cached, then measure the card's accuracies if missing."""
    folder = ARTIFACTS / spec.name
    card = folder / "card.json"
    if force or not is_cached(spec, folder) or not card.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        started = time.monotonic()
        model = train(spec)
        seconds = time.monotonic() - started
        export(model, folder)
        build_tokenizer().save(str(folder / "tokenizer.json"))
        (folder / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
        write_card(spec, folder, seconds)
    else:
        print(f"{spec.name}: artifacts match the spec, not retrained (use --force)")
    if force or "accuracy" not in json.loads(card.read_text()):
        add_accuracy(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--only", choices=[s.name for s in SPECS], help="build one model")
    args = parser.parse_args(argv)
    for spec in SPECS:
        if args.only in (None, spec.name):
            build(spec, args.force)


if __name__ == "__main__":
    main()

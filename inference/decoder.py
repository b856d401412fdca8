"""Decoding for ONNX decoders exported with the Hugging Face Optimum names.

One model folder holds config.json, tokenizer.json and model.onnx (inputs input_ids,
attention_mask, position_ids, past_key_values.N.key/value; outputs logits, present.N.*), so
the repo's zoo and a user's `optimum-cli` export load the same way. `DecoderModel.generate`
decodes a static batch with a KV cache; `ContinuousBatcher` lets requests join and leave a
running batch at every step. Both drive the same step (`DecoderModel.step`), and padding is
masked exactly, so a greedy row gets the same tokens alone, in a batch, or joining late.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from onnxruntime import OrtValue

from inference.runtime import GPU_PROVIDERS, Device, ModelLoadError, open_session, open_tokenizer

OnToken = Callable[[str], Awaitable[None]]
Array = np.ndarray[Any, Any]
# A KV cache tensor: on the host, or where the session put it when IO binding is on.
Cache: TypeAlias = Array | OrtValue


def on_host(tensor: Cache) -> Array:
    """The tensor as a numpy array, copied from the device if it lives there."""
    if isinstance(tensor, OrtValue):
        return np.asarray(tensor.numpy())
    return tensor


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, besides the eos token


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # every generated token, the eos that ended it included
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    logprobs: list[float]  # log-probability of each generated token under the model


@dataclass
class _Row:
    """One request in flight: what it asked for and what it has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    streamed: int = 0  # characters of `text` already handed out as deltas
    finish_reason: str | None = None
    on_token: OnToken | None = None
    future: asyncio.Future[Generation] | None = None

    def result(self) -> Generation:
        return Generation(
            text=self.text,
            token_ids=list(self.ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            logprobs=list(self.logprobs),
        )


@dataclass
class _Batch:
    """Rows decoding together; cache columns are shared and padding columns have mask 0."""

    rows: list[_Row]
    past: list[Cache]  # key, value per layer: [rows, heads, columns, head_dim]
    mask: Array  # [rows, columns], int64
    logits: Array  # [rows, vocab], float32: scores of each row's next token

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop the leading columns that no kept row uses.

        When every row stays and no column goes, the cache is left where it is (on the
        device, with IO binding), which is most steps.
        """
        mask = self.mask[indices]
        used = mask.any(axis=0)
        start = int(np.argmax(used)) if used.any() else mask.shape[1]
        if len(indices) == len(self.rows) and start == 0:
            return
        self.rows = [self.rows[i] for i in indices]
        self.mask = mask[:, start:]
        self.logits = self.logits[indices]
        self.past = [on_host(p)[indices][:, :, start:] for p in self.past]


def _left_pad(batch: _Batch, columns: int) -> tuple[list[Array], Array]:
    extra = columns - batch.mask.shape[1]
    past = [np.pad(on_host(p), ((0, 0), (0, 0), (extra, 0), (0, 0))) for p in batch.past]
    return past, np.pad(batch.mask, ((0, 0), (extra, 0)))


def merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of both; the shorter cache is left-padded with masked zero columns."""
    columns = max(a.mask.shape[1], b.mask.shape[1])
    (past_a, mask_a), (past_b, mask_b) = _left_pad(a, columns), _left_pad(b, columns)
    return _Batch(
        rows=a.rows + b.rows,
        past=[np.concatenate([x, y]) for x, y in zip(past_a, past_b, strict=True)],
        mask=np.concatenate([mask_a, mask_b]),
        logits=np.concatenate([a.logits, b.logits]),
    )


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters may still turn into a stop string (or a split byte)."""
    if text.endswith("\ufffd"):
        return 1
    return max(
        (k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0
    )


def choose(logits: Array, params: SamplingParams, rng: np.random.Generator) -> tuple[int, float]:
    """The next token (greedy, or sampled with temperature and top-p) and its log-probability."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    logprobs = shifted - np.log(np.exp(shifted).sum())
    if params.temperature <= 0:
        token = int(np.argmax(logits))
        return token, float(logprobs[token])
    probs = np.exp(shifted / params.temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    kept = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
    weights = np.cumsum(probs[kept])
    pick = int(np.searchsorted(weights, rng.random() * weights[-1], side="right"))
    token = int(kept[min(pick, len(kept) - 1)])
    return token, float(logprobs[token])


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} does not exist; a decoder folder needs it") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    missing = [
        key
        for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "eos_token_id")
        if key not in config
    ]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(missing)}")
    return config


class DecoderModel:
    """A decoder folder (config.json, tokenizer.json, model.onnx) ready to generate."""

    def __init__(
        self,
        folder: Path,
        device: Device = "auto",
        intra_op_threads: int | None = None,
        io_binding: bool | None = None,
    ) -> None:
        """`io_binding` keeps the KV cache where the session computes it between steps
        instead of copying it to the host and back; by default on when a GPU runs it."""
        config = _read_config(folder)
        self.layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or heads)
        self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        eos = config["eos_token_id"]
        self.eos = {int(t) for t in (eos if isinstance(eos, list) else [eos])}
        pad = config.get("pad_token_id")
        self.pad = int(pad if pad is not None else min(self.eos))
        self.max_positions = int(config.get("max_position_embeddings") or 1 << 30)
        self.tokenizer = open_tokenizer(folder / "tokenizer.json")
        self.session = open_session(folder / "model.onnx", device, intra_op_threads)
        on_gpu = self.session.get_providers()[0] in GPU_PROVIDERS
        self.cache_device = "cuda" if on_gpu else "cpu"
        self.io_binding = on_gpu if io_binding is None else io_binding
        self.past_names = [
            f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")
        ]
        self.output_names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")
        ]
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        lacking = [n for n in ["input_ids", "attention_mask", *self.past_names] if n not in inputs]
        lacking += [n for n in self.output_names if n not in outputs]
        if lacking:
            raise ModelLoadError(
                f"{folder / 'model.onnx'} is not an Optimum decoder with a KV cache for "
                f"{self.layers} layers: it lacks {', '.join(lacking)} (export it with "
                "`optimum-cli export onnx --task text-generation-with-past`)"
            )
        self.has_positions = "position_ids" in inputs
        half = inputs[self.past_names[0]].type == "tensor(float16)"
        self.past_dtype = np.float16 if half else np.float32
        self.generate(["warm up"], [SamplingParams(max_tokens=2)])

    def row(self, prompt: str, params: SamplingParams) -> _Row:
        """A request as a row, or ValueError when it can never run."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) >= self.max_positions:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model takes fewer than {self.max_positions}"
            )
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        return _Row(prompt_ids=ids, params=params, rng=np.random.default_rng(params.seed))

    def _run(
        self, ids: Array, mask: Array, positions: Array, past: list[Cache]
    ) -> tuple[Array, list[Cache]]:
        feeds: dict[str, Cache] = {
            "input_ids": ids,
            "attention_mask": mask,
            **dict(zip(self.past_names, past, strict=True)),
        }
        if self.has_positions:
            feeds["position_ids"] = positions
        if not self.io_binding:
            logits, *present = self.session.run(self.output_names, feeds)
            return np.asarray(logits[:, -1, :], dtype=np.float32), present
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.cache_device)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return np.asarray(logits.numpy()[:, -1, :], dtype=np.float32), present

    def prefill(self, rows: list[_Row]) -> _Batch:
        """Run every row's whole sequence so far, left-padded, from an empty cache."""
        sequences = [row.prompt_ids + row.ids for row in rows]
        width = max(len(s) for s in sequences)
        ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, sequence in enumerate(sequences):
            ids[i, width - len(sequence) :] = sequence
            mask[i, width - len(sequence) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((len(rows), self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
        logits, past = self._run(ids, mask, positions, [empty] * len(self.past_names))
        return _Batch(rows=rows, past=past, mask=mask, logits=logits)

    def _decode(self, batch: _Batch) -> None:
        """Feed each row's newest token against the cache."""
        ids = np.array([[row.ids[-1]] for row in batch.rows], dtype=np.int64)
        positions = np.array(
            [[len(row.prompt_ids) + len(row.ids) - 1] for row in batch.rows], dtype=np.int64
        )
        mask = np.concatenate([batch.mask, np.ones((len(batch.rows), 1), np.int64)], axis=1)
        batch.logits, batch.past = self._run(ids, mask, positions, batch.past)
        batch.mask = mask

    def _extend(self, row: _Row, logits: Array) -> str:
        """Add one token to a row, settle whether it is finished, and return its text delta."""
        token, logprob = choose(logits, row.params, row.rng)
        row.ids.append(token)
        row.logprobs.append(logprob)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in row.params.stop if stop and stop in text]
        if cuts:
            text = text[: min(cuts)]
        row.text = text
        if token in self.eos or cuts:
            row.finish_reason = "stop"
        elif (
            len(row.ids) >= row.params.max_tokens
            or len(row.prompt_ids) + len(row.ids) >= self.max_positions
        ):
            row.finish_reason = "length"
        held = 0 if row.finish_reason else _held_back(text, row.params.stop)
        visible = text[: len(text) - held]
        delta = visible[row.streamed :]
        row.streamed = max(row.streamed, len(visible))
        return delta

    def step(self, batch: _Batch, use_cache: bool = True) -> list[tuple[_Row, str]]:
        """One decode step: every row takes a token, finished rows leave, the rest run on.

        Returns each row's text delta, finished rows included (they are no longer in batch).
        """
        pairs = zip(batch.rows, batch.logits, strict=True)
        deltas = [(row, self._extend(row, logits)) for row, logits in pairs]
        batch.keep([i for i, row in enumerate(batch.rows) if row.finish_reason is None])
        if batch.rows and use_cache:
            self._decode(batch)
        elif batch.rows:
            fresh = self.prefill(batch.rows)
            batch.past, batch.mask, batch.logits = fresh.past, fresh.mask, fresh.logits
        return deltas

    def _generate(
        self, prompts: list[str], params: list[SamplingParams], use_cache: bool
    ) -> list[Generation]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        rows = [self.row(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        batch = self.prefill(rows)
        while batch.rows:
            self.step(batch, use_cache)
        return [row.result() for row in rows]

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Generation]:
        """Decode a static batch with left padding and a KV cache."""
        return self._generate(prompts, params, use_cache=True)

    def generate_without_cache(
        self, prompts: list[str], params: list[SamplingParams]
    ) -> list[Generation]:
        """Recompute every row's whole sequence at each step: the reference for the cache."""
        return self._generate(prompts, params, use_cache=False)


class ContinuousBatcher:
    """Iteration-level batching: requests join the running batch at the next step and leave
    the moment they finish, so a short answer never waits for a long one.

    One background task runs the steps, each ONNX call in a worker thread; at most
    `max_batch` rows run and the rest queue. A failing step fails the futures of its rows.
    """

    def __init__(self, model: DecoderModel, max_batch: int = 16) -> None:
        self.model = model
        self.max_batch = max_batch
        self._queue: deque[_Row] = deque()
        self._batch: _Batch | None = None
        self._admitting: list[_Row] = []  # taken from the queue, being prefilled
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(
        self, prompt: str, params: SamplingParams, on_token: OnToken | None = None
    ) -> Generation:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        row = self.model.row(prompt, params)
        row.on_token = on_token
        row.future = asyncio.get_running_loop().create_future()
        self._queue.append(row)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await row.future

    async def close(self) -> None:
        """Stop the background task; requests still in flight fail rather than hang."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(RuntimeError("the batcher was closed"))

    def _rows(self) -> list[_Row]:
        running = self._batch.rows if self._batch else []
        return [*self._queue, *self._admitting, *running]

    def _fail_all(self, exc: BaseException) -> None:
        _fail(self._rows(), exc)
        self._queue.clear()
        self._admitting = []
        self._batch = None

    async def _run(self) -> None:
        try:
            while True:
                await self._admit()
                if self._batch is None or not self._batch.rows:
                    self._wake.clear()
                    if not self._queue:
                        await self._wake.wait()
                    continue
                await self._step(self._batch)
        except Exception as exc:  # a bug here must not leave callers waiting forever
            self._fail_all(exc)

    async def _admit(self) -> None:
        """Prefill queued requests into the free slots and merge them into the batch."""
        room = self.max_batch - (len(self._batch.rows) if self._batch else 0)
        rows: list[_Row] = []
        while self._queue and len(rows) < room:
            row = self._queue.popleft()
            if row.future is not None and not row.future.done():
                rows.append(row)
        if not rows:
            return
        self._admitting = rows
        try:
            fresh = await asyncio.to_thread(self.model.prefill, rows)
            self._batch = fresh if self._batch is None else merge(self._batch, fresh)
        except Exception as exc:
            _fail(rows, exc)
        finally:
            self._admitting = []

    async def _step(self, batch: _Batch) -> None:
        rows = list(batch.rows)  # the step drops finished rows before it can fail
        try:
            deltas = await asyncio.to_thread(self.model.step, batch)
        except Exception as exc:
            _fail(rows, exc)
            self._batch = None
            return
        for row, delta in deltas:
            await _deliver(row, delta)
        # Rows whose caller gave up (cancelled) or whose callback failed stop computing too.
        batch.keep([i for i, row in enumerate(batch.rows) if row.future and not row.future.done()])


async def _deliver(row: _Row, delta: str) -> None:
    future = row.future
    if future is None or future.done():
        return
    if delta and row.on_token is not None:
        try:
            await row.on_token(delta)
        except Exception as exc:
            future.set_exception(exc)
            return
    if row.finish_reason is not None:
        future.set_result(row.result())


def _fail(rows: list[_Row], exc: BaseException) -> None:
    for row in rows:
        if row.future is not None and not row.future.done():
            row.future.set_exception(exc)

"""The ONNX decoding engine against the committed zoo: batching, cache and streaming agree."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from inference.decoder import ContinuousBatcher, DecoderModel, Generation, SamplingParams
from inference.runtime import ModelLoadError
from models.tasks import DIFFICULTIES, TASKS, check, make_items
from models.zoo import ARTIFACTS

ZOO = ("zoo-small", "zoo-large")
PROMPTS = [
    item.prompt
    for task in TASKS
    for difficulty in DIFFICULTIES
    for item in make_items(task, difficulty, 3, seed=11, split="heldout")
]
GREEDY = SamplingParams(max_tokens=20)


@pytest.fixture(scope="module", params=ZOO)
def model(request: pytest.FixtureRequest) -> DecoderModel:
    return DecoderModel(ARTIFACTS / request.param, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def small() -> DecoderModel:
    return DecoderModel(ARTIFACTS / "zoo-small", device="cpu", intra_op_threads=1)


def alone(model: DecoderModel, prompt: str, params: SamplingParams = GREEDY) -> Generation:
    return model.generate([prompt], [params])[0]


def assert_same(got: Generation, want: Generation) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_batched_greedy_equals_one_at_a_time(model: DecoderModel) -> None:
    batched = model.generate(PROMPTS, [GREEDY] * len(PROMPTS))
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert_same(got, alone(model, prompt))
    assert len({len(model.tokenizer.encode(p).ids) for p in PROMPTS}) > 1  # padding exercised


def test_cache_equals_recomputing(model: DecoderModel) -> None:
    params = [SamplingParams(max_tokens=n) for n in range(3, 3 + len(PROMPTS))]
    cached = model.generate(PROMPTS, params)
    for got, want in zip(cached, model.generate_without_cache(PROMPTS, params), strict=True):
        assert_same(got, want)


def test_io_binding_gives_the_same_tokens_and_keeps_the_cache_bound(
    small: DecoderModel,
) -> None:
    bound = DecoderModel(ARTIFACTS / "zoo-small", device="cpu", intra_op_threads=1, io_binding=True)
    params = [SamplingParams(max_tokens=n) for n in range(3, 3 + len(PROMPTS))]
    for got, want in zip(
        bound.generate(PROMPTS, params), small.generate(PROMPTS, params), strict=True
    ):
        assert_same(got, want)
    batch = bound.prefill([bound.row(p, GREEDY) for p in PROMPTS[:2]])
    bound.step(batch)
    assert len(batch.rows) == 2
    assert all(isinstance(p, ort.OrtValue) for p in batch.past)  # not copied back to the host


def test_answers_are_the_tasks(model: DecoderModel) -> None:
    items = make_items("reverse", "easy", 8, seed=5, split="heldout")
    outputs = model.generate([i.prompt for i in items], [GREEDY] * len(items))
    assert sum(check(i, out.text) for i, out in zip(items, outputs, strict=True)) >= 6
    assert all(out.finish_reason == "stop" and out.token_ids[-1] in model.eos for out in outputs)
    assert all(
        out.prompt_tokens == len(i.prompt) + 1 for i, out in zip(items, outputs, strict=True)
    )


async def test_continuous_batching_matches_running_alone(model: DecoderModel) -> None:
    batcher = ContinuousBatcher(model, max_batch=4)
    params = [SamplingParams(max_tokens=2 + i % 7) for i in range(len(PROMPTS))]

    async def late(i: int) -> Generation:
        await asyncio.sleep(0.002 * i)
        return await batcher.submit(PROMPTS[i], params[i])

    results = await asyncio.gather(*(late(i) for i in range(len(PROMPTS))))
    await batcher.close()
    for prompt, p, got in zip(PROMPTS, params, results, strict=True):
        assert_same(got, alone(model, prompt, p))


async def test_short_request_after_a_long_one_finishes_first(small: DecoderModel) -> None:
    batcher = ContinuousBatcher(small)
    long_prompt = "reverse abcdefghijkl="
    started = asyncio.Event()
    finished: list[str] = []

    async def first_token(_: str) -> None:
        started.set()

    async def run(name: str, prompt: str, params: SamplingParams, hook: bool) -> Generation:
        result = await batcher.submit(prompt, params, first_token if hook else None)
        finished.append(name)
        return result

    long_task = asyncio.create_task(run("long", long_prompt, SamplingParams(max_tokens=30), True))
    await started.wait()
    short = await run("short", "add 1+2=", SamplingParams(max_tokens=1), False)
    long = await long_task
    await batcher.close()
    assert finished == ["short", "long"]
    assert len(long.token_ids) > 3
    assert_same(long, alone(small, long_prompt, SamplingParams(max_tokens=30)))
    assert_same(short, alone(small, "add 1+2=", SamplingParams(max_tokens=1)))


async def test_at_most_max_batch_rows_run(small: DecoderModel) -> None:
    batcher = ContinuousBatcher(small, max_batch=2)
    widest = 0
    step = small.step

    def watched(batch, use_cache=True):  # type: ignore[no-untyped-def]
        nonlocal widest
        widest = max(widest, len(batch.rows))
        return step(batch, use_cache)

    small.step = watched  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(batcher.submit(p, GREEDY) for p in PROMPTS[:6]))
    finally:
        del small.step
        await batcher.close()
    assert widest == 2
    for prompt, got in zip(PROMPTS[:6], results, strict=True):
        assert_same(got, alone(small, prompt))


def test_seeded_sampling_is_reproducible(small: DecoderModel) -> None:
    params = [
        SamplingParams(max_tokens=12, temperature=4.0, top_p=0.95, seed=seed) for seed in range(6)
    ]
    prompts = ["sort qwertyuiop="] * len(params)
    first = small.generate(prompts, params)
    assert [g.token_ids for g in first] == [g.token_ids for g in small.generate(prompts, params)]
    assert len({tuple(g.token_ids) for g in first}) > 1  # the seeds really differ
    assert_same(alone(small, prompts[0], params[0]), first[0])


def test_stop_strings_and_max_tokens(small: DecoderModel) -> None:
    prompt = "reverse abcdefghij="
    free = alone(small, prompt)
    assert free.finish_reason == "stop" and len(free.text) >= 6
    stopped = alone(small, prompt, SamplingParams(stop=[free.text[3:5]]))
    assert stopped.text == free.text[:3]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:5]
    short = alone(small, prompt, SamplingParams(max_tokens=2))
    assert short.finish_reason == "length"
    assert short.token_ids == free.token_ids[:2] and short.text == free.text[:2]
    mixed = small.generate(
        [prompt] * 3, [GREEDY, SamplingParams(max_tokens=2), stopped_params(free)]
    )
    assert [g.finish_reason for g in mixed] == ["stop", "length", "stop"]
    assert [g.text for g in mixed] == [free.text, free.text[:2], free.text[:3]]


def stopped_params(free: Generation) -> SamplingParams:
    return SamplingParams(stop=["#", free.text[3:5]])


async def test_on_token_deltas_make_the_text(small: DecoderModel) -> None:
    batcher = ContinuousBatcher(small)
    free = alone(small, "reverse abcdefghij=")
    cases = [GREEDY, SamplingParams(stop=[free.text[4:7]]), SamplingParams(max_tokens=3)]
    chunks: list[list[str]] = [[] for _ in cases]

    def sink(i: int):  # type: ignore[no-untyped-def]
        async def on_token(delta: str) -> None:
            chunks[i].append(delta)

        return on_token

    results = await asyncio.gather(
        *(batcher.submit("reverse abcdefghij=", p, sink(i)) for i, p in enumerate(cases))
    )
    await batcher.close()
    for got, parts in zip(results, chunks, strict=True):
        assert "".join(parts) == got.text and all(parts)
    assert [r.text for r in results] == [free.text, free.text[:4], free.text[:3]]


async def test_a_failing_step_fails_its_requests(small: DecoderModel) -> None:
    batcher = ContinuousBatcher(small)

    def broken(batch, use_cache=True):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")

    small.step = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            await asyncio.wait_for(batcher.submit("add 1+2=", GREEDY), timeout=10)
    finally:
        del small.step
    assert_same(await batcher.submit("add 1+2=", GREEDY), alone(small, "add 1+2="))
    await batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit("add 1+2=", GREEDY)


async def test_a_row_that_finished_in_a_failing_step_is_answered_too(
    small: DecoderModel,
) -> None:
    """The step drops finished rows before it runs the model; if that run fails, the row
    that finished must still get an answer (here the failure), never silence."""
    batcher = ContinuousBatcher(small)

    def fail_decoding(_batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")

    small._decode = fail_decoding  # type: ignore[method-assign]
    try:
        short = batcher.submit("sort cba=", SamplingParams(max_tokens=1))
        long = batcher.submit("sort cba=", SamplingParams(max_tokens=10))
        results = await asyncio.wait_for(
            asyncio.gather(short, long, return_exceptions=True), timeout=10
        )
    finally:
        del small._decode
        await batcher.close()
    assert all(isinstance(r, RuntimeError) for r in results)


def copy_zoo(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(ARTIFACTS / "zoo-small", folder)
    return folder


def test_missing_model_file(tmp_path: Path) -> None:
    folder = copy_zoo(tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="does not exist"):
        DecoderModel(folder, device="cpu")


def test_corrupt_model_file(tmp_path: Path) -> None:
    folder = copy_zoo(tmp_path)
    (folder / "model.onnx").write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        DecoderModel(folder, device="cpu")


def test_graph_without_optimum_names(tmp_path: Path) -> None:
    folder = copy_zoo(tmp_path)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(folder / "model.onnx"),
    )
    with pytest.raises(ModelLoadError) as raised:
        DecoderModel(folder, device="cpu")
    assert "input_ids" in str(raised.value) and "present.1.value" in str(raised.value)


def test_card_accuracy_is_reproduced(model: DecoderModel) -> None:
    """The card's held-out accuracies, recomputed through this engine on the same items."""
    name = "zoo-small" if model.layers == 2 else "zoo-large"
    card = json.loads((ARTIFACTS / name / "card.json").read_text())
    heldout = card["heldout"]
    for task in TASKS:
        for difficulty in DIFFICULTIES:
            items = make_items(
                task, difficulty, heldout["items_per_cell"], heldout["seed"], "heldout"
            )
            outputs = model.generate([i.prompt for i in items], [GREEDY] * len(items))
            right = sum(check(i, o.text) for i, o in zip(items, outputs, strict=True))
            expected = card["accuracy"][task][difficulty]
            assert abs(right / len(items) - expected) <= 0.02, (task, difficulty, right, expected)

"""`llmflow bench fuzz`: a flood of malformed requests against a running worker.

Cases come from a seeded `random.Random`, not hypothesis: hypothesis draws values inside
`@given`, built for shrinking one failing example, while a flood wants many cases fast; a
seeded generator gives the same cases on every run. Each case is one of the shapes bad
input takes (raw bytes, broken JSON, bad UTF-8 or lone surrogates, JSON of the wrong
shape, wrong types, missing fields, oversized fields) or a random byte mutation of a valid
request (as atheris mutates), and is kept only when the worker's own `Preprocessor`
rejects it, which also says which request id (if any) the worker can read to answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from tqdm import tqdm

from agents.preprocess import InvalidRequest, Preprocessor
from llmflow.admin import read_partitions
from llmflow.client import LLMFlowClient, new_request
from llmflow.reports import print_rows, write_report
from schemas.messages import DeadLetter, ErrorCode, LLMResponse, Status
from topology.settings import Settings, load_settings

SEND_CHUNK = 500
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80")
WRONG_VALUES: tuple[Any, ...] = (
    None,
    7,
    -1.5,
    True,
    "",
    "x" * 300,
    [],
    [1, 2],
    {},
    {"role": "robot"},
)
LONE_SURROGATES = ("\\ud800", "\\udfff", "\\udbff x")


@dataclass(frozen=True)
class FuzzCase:
    """One malformed message: its bytes, how it was made, and the id the worker can read."""

    raw: bytes
    kind: str
    request_id: str | None
    reason: str


def _valid(rng: random.Random, index: int) -> dict[str, Any]:
    """A valid request whose every byte follows from the seed and `index`."""
    request = new_request(
        f"fuzz prompt {rng.random()}",
        f"fuzz-{rng.randrange(4)}",
        id=f"fuzz-{index}",
        created_at=1_700_000_000.0 + index,
    )
    data: dict[str, Any] = request.model_dump(mode="json")
    return data


def _encode(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


def _raw_bytes(rng: random.Random, data: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.randrange(0, 256))


def _invalid_json(rng: random.Random, data: dict[str, Any]) -> bytes:
    text = _encode(data)
    cut = rng.randrange(len(text))
    choice = rng.randrange(3)
    if choice == 0:
        return text[:cut]
    if choice == 1:
        return text[:cut] + rng.choice([b"{", b"}", b",", b'"', b":", b"]"]) + text[cut:]
    return text.replace(b'"', b"'", rng.randrange(1, 6))


def _bad_unicode(rng: random.Random, data: dict[str, Any]) -> bytes:
    text = _encode(data)
    if rng.random() < 0.5:
        at = text.index(b'"content": "') + len(b'"content": "')
        return text[:at] + rng.choice(BAD_UTF8) + text[at:]
    data["messages"][0]["content"] = "SURROGATE"
    return _encode(data).replace(b"SURROGATE", rng.choice(LONE_SURROGATES).encode())


def _wrong_shape(rng: random.Random, data: dict[str, Any]) -> bytes:
    shapes: list[Any] = [
        [data],
        rng.random(),
        "a request",
        None,
        {"request": data},
        {**data, "unexpected": 1},
    ]
    if rng.random() < 0.05:
        return b"[" * 5000 + b"]" * 5000  # deeper than the JSON parser recurses
    return _encode(rng.choice(shapes))


def _wrong_types(rng: random.Random, data: dict[str, Any]) -> bytes:
    field = rng.choice(
        ["tenant", "messages", "params", "priority", "deadline", "stream", "cache", "metadata"]
    )
    data[field] = rng.choice(WRONG_VALUES)
    if rng.random() < 0.3:
        data["messages"] = [{"role": rng.choice(["robot", 3, None]), "content": data["id"]}]
    return _encode(data)


def _missing_fields(rng: random.Random, data: dict[str, Any]) -> bytes:
    for field in rng.sample(["id", "tenant", "messages"], rng.randrange(1, 4)):
        del data[field]
    return _encode(data)


def _huge_field(rng: random.Random, data: dict[str, Any]) -> bytes:
    choice = rng.randrange(40)  # one in 40 over the byte limit keeps the flood's size modest
    if choice == 0:
        data["messages"][0]["content"] = "x" * rng.randrange(66_000, 70_000)
    elif choice < 14:
        data["tenant"] = "t" * rng.randrange(129, 5000)
    elif choice < 27:
        data["params"]["max_tokens"] = rng.choice([0, -5, 10**9])
    else:
        data["model"] = "m" * rng.randrange(1, 64)
    return _encode(data)


def _mutated(rng: random.Random, data: dict[str, Any]) -> bytes:
    buffer = bytearray(_encode(data))
    for _ in range(rng.randrange(1, 9)):
        at = rng.randrange(len(buffer))
        operation = rng.randrange(4)
        if operation == 0:
            buffer[at] ^= 1 << rng.randrange(8)
        elif operation == 1:
            buffer.insert(at, rng.randrange(256))
        elif operation == 2 and len(buffer) > 1:
            del buffer[at]
        else:
            span = bytes(buffer[at : at + rng.randrange(1, 16)])
            buffer[at:at] = span
    return bytes(buffer)


MAKERS: dict[str, Callable[[random.Random, dict[str, Any]], bytes]] = {
    "raw_bytes": _raw_bytes,
    "invalid_json": _invalid_json,
    "bad_unicode": _bad_unicode,
    "wrong_shape": _wrong_shape,
    "wrong_types": _wrong_types,
    "missing_fields": _missing_fields,
    "huge_field": _huge_field,
    "mutated": _mutated,
}


def malformed(settings: Settings, count: int, seed: int = 0) -> Iterator[FuzzCase]:
    """`count` cases the preprocess stage rejects, cycling through every kind. A case whose
    readable reply topic would send its answer elsewhere is drawn again."""
    rng = random.Random(seed)
    preprocessor = Preprocessor(settings)
    kinds = list(MAKERS)
    made = 0
    index = 0
    while made < count:
        kind = kinds[index % len(kinds)]
        raw = MAKERS[kind](rng, _valid(rng, index))
        index += 1
        try:
            preprocessor.parse(raw)
        except InvalidRequest as error:
            if error.reply_topic is None:
                made += 1
                yield FuzzCase(raw, kind, error.request_id, error.reason)


@dataclass
class FloodResult:
    sent: int
    send_s: float
    answered_s: float
    answers: dict[str, LLMResponse]
    unanswered: list[str]
    letters: Counter[bytes]
    letter_reasons: Counter[str]


async def _dlq_ends(settings: Settings) -> tuple[list[TopicPartition], dict[TopicPartition, int]]:
    """The DLQ's partitions and one past the last letter each holds now."""
    spec = settings.topics.dlq
    partitions = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
    ends = {tp: 0 for tp in partitions}
    for record in await read_partitions(settings.bootstrap_servers, partitions):
        tp = TopicPartition(record.topic, record.partition)
        ends[tp] = max(ends[tp], record.offset + 1)
    return partitions, ends


async def flood(
    settings: Settings, cases: list[FuzzCase], answer_timeout_s: float, progress: bool = True
) -> FloodResult:
    """Send every case onto the request topic as fast as the producer takes them, wait for
    each readable id's answer, then read the dead letters written since the flood began."""
    partitions, starts = await _dlq_ends(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=5, max_request_size=1 << 20
    )
    async with LLMFlowClient(settings) as client:
        futures = {c.request_id: client.expect(c.request_id) for c in cases if c.request_id}
        await producer.start()
        bar = tqdm(total=len(cases), desc="malformed sent", unit="msg", disable=not progress)
        began = time.monotonic()
        try:
            for at in range(0, len(cases), SEND_CHUNK):
                chunk = cases[at : at + SEND_CHUNK]
                sends = [
                    await producer.send(
                        settings.topics.requests.name,
                        case.raw,
                        key=case.request_id.encode() if case.request_id else None,
                    )
                    for case in chunk
                ]
                await asyncio.gather(*sends)
                bar.update(len(chunk))
        finally:
            bar.close()
            await producer.stop()
        send_s = time.monotonic() - began
        done, _ = await asyncio.wait(futures.values(), timeout=answer_timeout_s)
        answered_s = time.monotonic() - began
    answers = {rid: f.result() for rid, f in futures.items() if f in done}
    unanswered = [rid for rid, f in futures.items() if f not in done]
    letters: Counter[bytes] = Counter()
    reasons: Counter[str] = Counter()
    wanted = len(cases)
    deadline = time.monotonic() + answer_timeout_s
    while sum(letters.values()) < wanted and time.monotonic() < deadline:
        letters.clear()
        reasons.clear()
        for record in await read_partitions(settings.bootstrap_servers, partitions, starts):
            letter = DeadLetter.model_validate_json(record.value or b"")
            letters[base64.b64decode(letter.raw_b64)] += 1
            reasons[letter.reason] += 1
        if sum(letters.values()) < wanted:
            await asyncio.sleep(2.0)
    return FloodResult(len(cases), send_s, answered_s, answers, unanswered, letters, reasons)


def check(cases: list[FuzzCase], result: FloodResult) -> dict[str, Any]:
    """What the flood shows: answers that are not `invalid` errors, letters missing or extra
    against what was sent, and letters blaming a crash rather than the input."""
    wrong = [
        rid
        for rid, r in result.answers.items()
        if r.status is not Status.ERROR or r.error is None or r.error.code is not ErrorCode.INVALID
    ]
    sent = Counter(c.raw for c in cases)
    return {
        "messages": len(cases),
        "readable_ids": len({c.request_id for c in cases if c.request_id}),
        "answered_invalid": len(result.answers) - len(wrong),
        "answered_otherwise": len(wrong),
        "unanswered": len(result.unanswered),
        "dead_letters": sum(result.letters.values()),
        "dead_letters_missing": sum((sent - result.letters).values()),
        "dead_letters_extra": sum((result.letters - sent).values()),
        "dead_letter_reasons": dict(sorted(result.letter_reasons.items())),
        "internal_errors": result.letter_reasons.get("internal_error", 0),
    }


def run(args: argparse.Namespace) -> int:
    # Imported here: llmflow.cli imports the benchmarks, and its embedded stack is reused.
    from llmflow.cli import _embedded

    settings = load_settings(args.config)
    started = time.monotonic()
    cases = list(
        tqdm(malformed(settings, args.count, args.seed), total=args.count, desc="generated")
    )
    generate_s = time.monotonic() - started
    with _embedded(settings, 1, ["--latency-ms", "20"]) as (running, workers):
        pid = workers.processes[0].pid
        result = asyncio.run(flood(running, cases, args.answer_timeout_s))
        log = Path(workers.run_dir / "worker-0.log").read_text(errors="replace")
        alive = workers.alive() == [True] and workers.processes[0].pid == pid

        async def probe(client: LLMFlowClient) -> LLMResponse:
            return await client.call(new_request("still there?", "fuzz"), timeout=120)

        async def after() -> LLMResponse:
            async with LLMFlowClient(running) as client:
                return await probe(client)

        valid = asyncio.run(after())
    report = {
        **check(cases, result),
        "kinds": dict(sorted(Counter(c.kind for c in cases).items())),
        "worker_alive_same_pid": alive,
        "tracebacks_in_worker_log": log.count("Traceback"),
        "valid_request_after": valid.status.value,
        "generate_s": round(generate_s, 1),
        "send_s": round(result.send_s, 1),
        "sent_per_s": round(result.sent / result.send_s, 1) if result.send_s else 0.0,
        "all_answered_s": round(result.answered_s, 1),
        "seed": args.seed,
    }
    print_rows(report.items())
    write_report(report, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-timeout-s", type=float, default=900.0)

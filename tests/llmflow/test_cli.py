"""The CLI's offline commands, and a worker that cannot load its models."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmflow import cli, ingress
from llmflow.cli import main, parser
from topology.settings import Settings


def test_schema_writes_every_wire_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{s}.schema.json"
        for s in (
            "request",
            "response",
            "stream_chunk",
            "dead_letter",
            "feedback",
            "cancel",
            "status",
            "envelope",
        )
    )
    request = json.loads((tmp_path / "request.schema.json").read_text())
    assert "messages" in request["required"]
    assert capsys.readouterr().out.count(str(tmp_path)) == 8


@pytest.mark.parametrize(
    "argv",
    [["up", "--demo", "5"], ["worker"], ["submit", "hi"], ["schema"], ["topics", "create"]],
)
def test_every_command_parses(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    assert args.command == argv[0] and callable(args.func)


def test_up_defaults_to_one_worker_and_exits_after_the_demo() -> None:
    args = parser().parse_args(["up", "--demo", "5"])
    assert args.demo == 5 and args.workers == 1 and not args.serve


def test_a_worker_with_a_corrupt_local_model_stops_with_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "zoo-small"
    zoo_small = Settings().model("zoo-small")
    assert zoo_small is not None
    shutil.copytree(zoo_small.path or "", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    models = [
        spec.model_copy(update={"path": str(broken)}) if spec.name == "zoo-small" else spec
        for spec in Settings().models
    ]
    env = {
        **os.environ,
        "LLMFLOW_MODELS": json.dumps([m.model_dump(mode="json") for m in models]),
        "LLMFLOW_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "llmflow.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"{broken / 'model.onnx'} could not be loaded" in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--stages", "dedup,cache"], {}, "splits ['dedup', 'cache', 'route', 'postprocess'"),
        ([], {"LLMFLOW_WORKER_STAGES": "preprocess,bacth"}, "unknown stages ['bacth']"),
    ],
)
def test_a_worker_given_stages_it_cannot_run_stops_with_a_clear_error(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmflow.cli", "worker", *argv],
        env={**os.environ, **env, "LLMFLOW_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_feedback_reads_a_verdict_or_a_rating() -> None:
    wrong = parser().parse_args(["feedback", "r1", "--tenant", "acme", "--wrong"])
    assert (wrong.id, wrong.tenant, wrong.correct, wrong.rating) == ("r1", "acme", False, None)
    right = parser().parse_args(["feedback", "r1", "--tenant", "acme", "--correct"])
    assert right.correct is True
    rated = parser().parse_args(["feedback", "r1", "--tenant", "acme", "--rating", "0.5"])
    assert (rated.correct, rated.rating) == (None, 0.5)
    with pytest.raises(SystemExit):
        parser().parse_args(["feedback", "r1", "--tenant", "acme", "--correct", "--wrong"])


def test_serve_without_api_keys_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LLMFLOW_INGRESS__API_KEYS", raising=False)
    assert parser().parse_args(["serve", "--port", "0"]).port == 0
    assert main(["serve", "--port", "0"]) == 2
    assert "no API keys" in capsys.readouterr().err


def test_serve_freezes_its_heap_once_serving(
    monkeypatch: pytest.MonkeyPatch, thawed_heap: None
) -> None:
    """`llmflow serve` runs for good: a full collection of its heap stalled it 62 to 99 ms."""

    class Serving:
        base_url = "http://127.0.0.1:1/v1"

        def __init__(self, _settings: Settings) -> None:
            pass

        async def __aenter__(self) -> Serving:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            return None

    async def stopped() -> None:
        frozen.append(gc.get_freeze_count())

    frozen: list[int] = []
    monkeypatch.setattr(ingress, "IngressServer", Serving)
    monkeypatch.setattr(cli, "_until_signal", stopped)
    asyncio.run(cli._serve(Settings()))
    assert frozen and frozen[0] > 0

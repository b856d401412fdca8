"""The CLI's offline commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow.cli import main, parser


def test_schema_writes_every_wire_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{s}.schema.json"
        for s in ("request", "response", "stream_chunk", "dead_letter", "feedback", "envelope")
    )
    request = json.loads((tmp_path / "request.schema.json").read_text())
    assert "messages" in request["required"]
    assert capsys.readouterr().out.count(str(tmp_path)) == 6


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

"""JSON Schema export: one file per wire model."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.export import write_json_schemas
from schemas.messages import wire_models


def test_writes_one_schema_per_wire_model(tmp_path: Path) -> None:
    out = tmp_path / "schemas" / "nested"
    written = write_json_schemas(out)
    expected = {f"{stem}.schema.json" for stem in wire_models()}
    assert {p.name for p in written} == expected
    assert {p.name for p in out.iterdir()} == expected
    assert len(expected) == 8
    for path in written:
        schema = json.loads(path.read_text())
        assert isinstance(schema["properties"], dict)
        assert "schema_version" in schema["properties"]
        assert schema.get("additionalProperties") is False


def test_request_schema_names_required_fields(tmp_path: Path) -> None:
    write_json_schemas(tmp_path)
    schema = json.loads((tmp_path / "request.schema.json").read_text())
    assert set(schema["required"]) == {"id", "tenant", "messages"}
    assert schema["properties"]["schema_version"]["default"] == 1


def test_export_is_idempotent(tmp_path: Path) -> None:
    first = [p.read_text() for p in write_json_schemas(tmp_path)]
    second = [p.read_text() for p in write_json_schemas(tmp_path)]
    assert first == second


def test_committed_schemas_match_the_models(tmp_path: Path) -> None:
    """schemas/json is what other languages publish against; `make schema` refreshes it."""
    committed = Path(__file__).resolve().parents[2] / "schemas" / "json"
    for path in write_json_schemas(tmp_path):
        assert (committed / path.name).read_text() == path.read_text(), path.name

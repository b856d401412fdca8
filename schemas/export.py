"""JSON Schema export, so agents written in other languages can publish valid requests."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.messages import wire_models


def write_json_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, model in wire_models().items():
        path = out_dir / f"{stem}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
        written.append(path)
    return written

"""The committed model artifacts and their checksums.

Trained models (the decoder zoo, the complexity classifier) and the torch reference
embeddings are small, so they are committed under `models/artifacts/` with a SHA256SUMS
file; `check` tells `make models` whether they are whole, so tests never retrain.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SUMS = ARTIFACTS / "SHA256SUMS"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifact_files(root: Path = ARTIFACTS) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS.name)


def write_sums(root: Path = ARTIFACTS) -> str:
    text = "".join(f"{digest(p)}  {p.relative_to(root)}\n" for p in artifact_files(root))
    (root / SUMS.name).write_text(text)
    return text


def check_sums(root: Path = ARTIFACTS) -> list[str]:
    """What is wrong with the artifacts under `root`; empty when all are whole."""
    sums = root / SUMS.name
    if not sums.is_file():
        return [f"{sums} is missing"]
    problems = []
    listed = set()
    for line in sums.read_text().splitlines():
        expected, name = line.split("  ", 1)
        listed.add(name)
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif digest(path) != expected:
            problems.append(f"{name} does not match its checksum")
    if not listed:
        problems.append("no artifacts are listed")
    return problems


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "write":
        print(write_sums(), end="")
        return 0
    problems = check_sums()
    for problem in problems:
        print(f"models: {problem}", file=sys.stderr)
    if not problems:
        print(f"models: {len(artifact_files())} committed artifacts match their checksums")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

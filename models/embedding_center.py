"""The mean MiniLM embedding of ShareGPT prompts, which the LSH hyperplanes pass through.

Sentence embeddings share a common direction, so hyperplanes through the origin cut the
cloud of prompts unevenly; through its mean they split it about in half each
(`llmflow bench locality` measures both). Every worker reads the committed file, so all
compute the same buckets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from inference.encoder import Encoder
from llmflow.prompts import load_prompts
from models.embedding import ensure_embedding_model
from topology.settings import EMBEDDING_CENTER, load_settings

PROMPTS = 5000
DECIMALS = 6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--out", type=Path, default=EMBEDDING_CENTER)
    args = parser.parse_args(argv)
    settings = load_settings()
    folder = ensure_embedding_model(Path(settings.embedding.path))
    prompts = load_prompts(args.prompts)
    vectors = Encoder(folder, "cpu", None, 64).embed(prompts)
    center = np.round(vectors.astype(np.float64).mean(axis=0), DECIMALS)
    report = {
        "model": folder.name,
        "prompts": len(prompts),
        "norm": round(float(np.linalg.norm(center)), 4),
        "center": center.tolist(),
    }
    args.out.write_text(json.dumps(report) + "\n")
    print(f"wrote {args.out}: mean of {len(prompts)} prompts, norm {report['norm']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

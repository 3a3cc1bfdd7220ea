"""Backends: a loader turns an artifact into a runner; the runner maps input arrays to embeddings.

Every backend module exposes `load(manifest, threads) -> Backend`. Selection is explicit: a provider
that is not available raises, it never falls back to another.
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
    from . import onnxruntime as ort_backend

    return ort_backend.load(manifest, provider, threads)

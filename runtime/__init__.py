"""Lean runtime (numpy, onnxruntime, tokenizers): load an artifact and embed texts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .manifest import ArtifactError, Manifest, load_manifest

if TYPE_CHECKING:
    from .encoder import Encoder

__all__ = ["Encoder", "ArtifactError", "Manifest", "load_manifest"]


def __getattr__(name: str) -> Any:
    # Lazy: the manifest and the CPU helper (runtime.machine: `stableembed info`, the benchmarks' parent
    # processes) load without numpy, onnxruntime or tokenizers.
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'stableembed.runtime' has no attribute {name!r}")

"""Lean runtime (numpy, onnxruntime, tokenizers): load an artifact and embed texts."""

from .encoder import Encoder
from .manifest import ArtifactError, Manifest, load_manifest

__all__ = ["Encoder", "ArtifactError", "Manifest", "load_manifest"]

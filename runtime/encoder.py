"""The Encoder: load an artifact once, embed texts in batches, return float32 embeddings in input order."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, overload

import numpy as np

from .backends import Backend, load_backend
from .manifest import Manifest, load_manifest
from .schedule import Batch, plan_dynamic, plan_fixed
from .tokenize import TextTokenizer, check_texts

MODES = ("dynamic", "fixed")


class Encoder:
    """Embeds texts with a stableembed artifact.

    Each text's embedding is bit-identical whatever batch, position, companions, mode or thread count
    it is computed with (on one artifact and provider).

    Args:
        path: the artifact folder written by `stableembed export`.
        mode: "dynamic" pads each batch to its own longest text; "fixed" runs only the manifest's static
            (batch, length) buckets, as TensorRT engines and CUDA graphs need.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        provider: "cpu", "cuda" or "tensorrt"; a provider that is not installed raises.
        check_hashes: verify every artifact file's sha256 on load.
    """

    def __init__(self, path: str | Path, mode: str = "dynamic", threads: int | None = None,
                 provider: str = "cpu", check_hashes: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.manifest: Manifest = load_manifest(path, check_hashes=check_hashes)
        if mode == "fixed" and max(t for _, t in self.manifest.fixed_buckets) < self.manifest.max_length:
            raise ValueError("the manifest's fixed buckets do not reach its max_length")
        self.mode = mode
        self.provider = provider
        self.threads = threads
        self.tokenizer = TextTokenizer(self.manifest)
        self.backend: Backend = load_backend(self.manifest, provider, threads)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def plan(self, lengths: list[int], batch_size: int) -> list[Batch]:
        if self.mode == "fixed":
            return plan_fixed(lengths, self.manifest.fixed_buckets)
        return plan_dynamic(lengths, batch_size)

    @overload
    def encode(self, texts: str, batch_size: int = ..., show_progress: bool = ...) -> np.ndarray: ...
    @overload
    def encode(self, texts: Iterable[str], batch_size: int = ..., show_progress: bool = ...) -> np.ndarray: ...

    def encode(self, texts, batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """Embed `texts` -> float32 [N, dim] in input order; a single str gives [dim].

        In fixed mode the manifest's buckets set the batch sizes and `batch_size` is not used.
        """
        if isinstance(texts, str):
            return self.encode([texts], batch_size)[0]
        items = check_texts(texts)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        encodings = self.tokenizer.encode(items)
        batches = self.plan([len(e.ids) for e in encodings], batch_size)
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(items), unit="text", desc="embedding")
        for batch in batches:
            result = self.backend.run(self.tokenizer.feeds(encodings, batch))
            out[list(batch.indices)] = result[: len(batch.indices)]
            if progress is not None:
                progress.update(len(batch.indices))
        if progress is not None:
            progress.close()
        return out

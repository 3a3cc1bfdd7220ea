"""The Encoder: load an artifact once, embed texts in batches, return float32 embeddings in input order."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, overload

import numpy as np
from tokenizers import Encoding

from .backends import Backend, load_backend
from .manifest import Manifest, load_manifest
from .schedule import Batch, plan_dynamic, plan_fixed
from .tokenize import TextTokenizer, check_texts

MODES = ("dynamic", "fixed")
# Padded tokens in one model run (dynamic mode): the Encoder's and every CLI command's default. 2,048
# measured ~1.9x faster than 4,096 on mixed lengths on CPU (README, Performance).
DEFAULT_MAX_BATCH_TOKENS = 2048


@dataclass
class _Request:
    encodings: list[Encoding]
    batch_size: int
    out: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Encoder:
    """Embeds texts with a stableembed artifact.

    Each text's embedding is bit-identical whatever batch, position, companions, mode or thread count
    it is computed with (on one artifact and provider). That is what makes it safe to share batches:
    `encode` may be called from many threads at once, and texts from concurrent calls are merged into
    common batches (micro-batching) without changing any result.

    Args:
        path: the artifact folder written by `stableembed export`.
        mode: "dynamic" pads each batch to its own longest text; "fixed" runs only the manifest's static
            (batch, length) buckets, as TensorRT engines and CUDA graphs need.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        provider: "cpu", "cuda" or "tensorrt"; a provider that is not installed raises.
        check_hashes: verify every artifact file's sha256 on load.
        truncate: cut texts to the manifest's max_length tokens (as sentence-transformers does);
            False raises ValueError for a longer text instead.
        max_batch_tokens: in dynamic mode, a batch (one model run) also closes when its padded size
            would pass this many tokens (long texts run in smaller batches, which is faster on CPU).
    """

    def __init__(self, path: str | Path, mode: str = "dynamic", threads: int | None = None,
                 provider: str = "cpu", check_hashes: bool = True, truncate: bool = True,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.manifest: Manifest = load_manifest(path, check_hashes=check_hashes)
        if mode == "fixed" and max(t for _, t in self.manifest.fixed_buckets) < self.manifest.max_length:
            raise ValueError("the manifest's fixed buckets do not reach its max_length")
        self.mode = mode
        self.provider = provider
        self.threads = threads
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = TextTokenizer(self.manifest, truncate=truncate)
        self.backend: Backend = load_backend(self.manifest, provider, threads)
        self._pending: deque[_Request] = deque()
        self._pending_lock = threading.Lock()
        self._run_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def plan(self, lengths: list[int], batch_size: int) -> list[Batch]:
        if self.mode == "fixed":
            return plan_fixed(lengths, self.manifest.fixed_buckets)
        return plan_dynamic(lengths, batch_size, self.max_batch_tokens)

    @overload
    def encode(self, texts: str, batch_size: int = ..., show_progress: bool = ...) -> np.ndarray: ...
    @overload
    def encode(self, texts: Iterable[str], batch_size: int = ..., show_progress: bool = ...) -> np.ndarray: ...

    def encode(self, texts, batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """Embed `texts` -> float32 [N, dim] in input order; a single str gives [dim].

        Raises TypeError / ValueError naming the index of a bad text; nothing else is affected.
        In fixed mode the manifest's buckets set the batch sizes and `batch_size` is not used.
        """
        if isinstance(texts, str):
            return self.encode([texts], batch_size)[0]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = check_texts(texts)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        # Tokenize in the caller's thread: bad input fails here, alone, and tokenizing overlaps with
        # whatever batch another thread is running.
        request = _Request(self.tokenizer.encode(items), batch_size, out)
        if show_progress:
            with self._run_lock:
                self._run([request], progress=True)
        else:
            self._submit(request)
        if request.error is not None:
            raise request.error
        return out

    def encode_stream(self, texts: Iterable[str], chunk_size: int = 4096, batch_size: int = 32,
                      show_progress: bool = False, total: int | None = None) -> Iterator[np.ndarray]:
        """Embed an iterable of any length chunk by chunk, yielding float32 [<=chunk_size, dim] arrays in
        order. Memory stays bounded by one chunk of texts and embeddings, whatever the input's length."""
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, unit="text", desc="embedding")
        iterator, offset = iter(texts), 0
        try:
            while chunk := list(itertools.islice(iterator, chunk_size)):
                yield self._encode_chunk(chunk, offset, batch_size)
                offset += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            if progress is not None:
                progress.close()

    def _encode_chunk(self, chunk: list[str], offset: int, batch_size: int) -> np.ndarray:
        try:
            return self.encode(chunk, batch_size=batch_size)
        except (TypeError, ValueError) as exc:  # name the index in the whole stream, not in the chunk
            msg = str(exc)
            if msg.startswith("text at index "):
                local = int(msg.split()[3].rstrip(","))
                raise type(exc)(msg.replace(f"index {local}", f"index {offset + local}", 1)) from None
            raise

    def _submit(self, request: _Request) -> None:
        """Flat combining: whoever holds the run lock runs every pending request's texts as shared
        batches; the others wait for their results or take the lock for the next round."""
        with self._pending_lock:
            self._pending.append(request)
        while not request.done.is_set():
            if self._run_lock.acquire(timeout=0.05):
                try:
                    with self._pending_lock:
                        taken = list(self._pending)
                        self._pending.clear()
                    if taken:
                        self._run(taken)
                finally:
                    self._run_lock.release()

    def _run(self, requests: list[_Request], progress: bool = False) -> None:
        encodings = [e for r in requests for e in r.encodings]
        owners = [(r, i) for r in requests for i in range(len(r.encodings))]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(encodings), unit="text", desc="embedding")
        try:
            for batch in self.plan([len(e.ids) for e in encodings], min(r.batch_size for r in requests)):
                result = self.backend.run(self.tokenizer.feeds(encodings, batch))
                for row, idx in enumerate(batch.indices):
                    req, i = owners[idx]
                    req.out[i] = result[row]
                if bar is not None:
                    bar.update(len(batch.indices))
        except BaseException as exc:  # the backend failed: every request in this round gets the error
            for r in requests:
                r.error = exc
        finally:
            if bar is not None:
                bar.close()
            for r in requests:
                r.done.set()

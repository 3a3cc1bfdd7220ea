"""The Encoder: load an artifact once, embed texts in batches, return float32 embeddings in input order."""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, overload

import numpy as np
from tokenizers import Encoding

from ..kernels.normalize import normalize_reference
from .backends import Backend, load_backend
from .cache import EmbeddingCache
from .manifest import Manifest, load_manifest
from .schedule import Batch, check_buckets, plan_dynamic, plan_fixed
from .tokenize import TextTokenizer, check_texts, model_prompts, resolve_prompt

MODES = ("dynamic", "fixed")
# Padded tokens in one model run (dynamic mode): the Encoder's and every CLI command's default. 2,048
# measured ~1.9x faster than 4,096 on mixed lengths on CPU (README, Performance).
DEFAULT_MAX_BATCH_TOKENS = 2048


@dataclass
class _Row:
    """The two fields of a token encoding that `TextTokenizer.feeds` reads (warm_up's synthetic row)."""

    ids: list[int]
    type_ids: list[int]


@dataclass
class _Request:
    encodings: list[Encoding]
    batch_size: int
    out: np.ndarray
    prompt_length: int = 0  # leading tokens of every text left out of pooling (include_prompt=False)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@contextmanager
def _naming_indices(index_of: Callable[[int], int]) -> Iterator[None]:
    """Re-raise a TypeError / ValueError that names "text at index i" of a sub-list as naming
    `index_of(i)`, the caller's index; any other error (or an unchanged index) passes as it is."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if not msg.startswith("text at index "):
            raise
        local = int(msg.split()[3].rstrip(","))
        if index_of(local) == local:
            raise
        raise type(exc)(msg.replace(f"index {local}", f"index {index_of(local)}", 1)) from None


def check_chunk_size(chunk_size: int) -> None:
    """ValueError unless chunk_size is a positive int (a chunk of 0 texts would end a stream at once)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_batch_size(batch_size: int) -> None:
    """ValueError unless batch_size is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def check_truncate_dim(truncate_dim: int | None, dim: int) -> int | None:
    """`truncate_dim` if it is None or an int in 1..dim; else a ValueError naming the model's width."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= dim:
        raise ValueError(f"truncate_dim must be an int from 1 to {dim} (the model's embedding width), "
                         f"got {truncate_dim!r}")
    return truncate_dim


def finish_rows(emb: np.ndarray, truncate_dim: int | None, normalize: bool) -> np.ndarray:
    """The model's rows as returned to the caller, as sentence-transformers' `encode` shapes them: the first
    `truncate_dim` components (None: all), then L2-normalized when `normalize`. Both act on each row
    alone, normalization with the kernel's NumPy reference (its fixed reduction order), so a row's bits
    still depend on its text alone."""
    if truncate_dim is not None and truncate_dim < emb.shape[-1]:
        emb = np.ascontiguousarray(emb[..., :truncate_dim])
    if normalize:
        emb = normalize_reference(emb.reshape(-1, emb.shape[-1])).reshape(emb.shape)
    return emb


def _distinct_rows(requests: list[_Request]) -> tuple[list[Encoding], list[int], list[list[tuple[_Request, int]]]]:
    """The round's distinct rows, in first-seen order: encodings, prompt lengths, and for each row every
    (request, index) that asked for it. A row's embedding depends on its tokens and prompt length alone
    (the stability guarantee), so identical texts in one round (repeated lines of a corpus, the same
    query from concurrent callers) run once and every copy gets the very same bits."""
    first: dict[tuple, int] = {}
    encodings: list[Encoding] = []
    prompt_lengths: list[int] = []
    owners: list[list[tuple[_Request, int]]] = []
    for r in requests:
        for i, e in enumerate(r.encodings):
            key = (tuple(e.ids), tuple(e.type_ids), r.prompt_length)
            row = first.setdefault(key, len(encodings))
            if row == len(encodings):
                encodings.append(e)
                prompt_lengths.append(r.prompt_length)
                owners.append([])
            owners[row].append((r, i))
    return encodings, prompt_lengths, owners


class Encoder:
    """Embeds texts with a stableembed artifact.

    Each text's embedding is bit-identical whatever batch, position, companions, mode or thread count
    it is computed with (on one artifact and provider). That is what makes it safe to share batches:
    `encode` may be called from many threads at once, and texts from concurrent calls are merged into
    common batches (micro-batching) without changing any result, and identical texts in one round (the
    same tokens and prompt) run once.

    Args:
        path: the artifact folder written by `stableembed export`.
        mode: "dynamic" pads each batch to its own longest text; "fixed" runs only the manifest's static
            (batch, length) buckets, as TensorRT engines and CUDA graphs need.
        threads: intra-op threads of each model run (None: onnxruntime's default, one per physical core).
        provider: "cpu", "cuda" or "tensorrt"; a provider that is not installed raises.
        check_hashes: verify every artifact file's sha256 on load (a large file whose earlier check left a
            stamp and that has not changed since is not re-read: runtime/stamps.py).
        truncate: cut texts to the manifest's max_length tokens (as sentence-transformers does);
            False raises ValueError for a longer text instead.
        max_batch_tokens: in dynamic mode, a batch (one model run) also closes when its padded size
            would pass this many tokens (long texts run in smaller batches, which is faster on CPU).
        parallel_runs: CPU only: model runs (batches) in flight at once, each on its own `threads`
            intra-op threads (None: the CPUs this process may use, divided among the runs). A throughput
            setting for large requests (corpora): batches need no intra-op hand-offs, but a lone text
            gets only its run's threads, and a request of a few batches waits for its slowest one
            (README, Performance). The results are the same bits.
        cache_size: keep the embeddings of up to this many recent (prompt, text) pairs and answer
            repeats from them without running the model (0: no cache). Exact, by the guarantee above: a
            hit has the bits a new run would give. `enc.cache.info()` counts hits and misses.
        truncate_dim: return only the first this many components of each embedding (Matryoshka models),
            as sentence-transformers' `truncate_dim`; None: the model's own (`manifest.truncate_dim`, from its
            sentence-transformers config), else the full width (`manifest.dim` asks for it). `dim` is then this.
        normalize_embeddings: L2-normalize each returned row (after truncation), as sentence-transformers'
            `encode(normalize_embeddings=True)`. Both are also per-call arguments of `encode`.
    """

    def __init__(self, path: str | Path, mode: str = "dynamic", threads: int | None = None,
                 provider: str = "cpu", check_hashes: bool = True, truncate: bool = True,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, parallel_runs: int = 1, cache_size: int = 0,
                 truncate_dim: int | None = None, normalize_embeddings: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if parallel_runs < 1:
            raise ValueError(f"parallel_runs must be >= 1, got {parallel_runs}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if parallel_runs > 1 and provider != "cpu":
            # One TensorRT execution context must not run two batches at once, and a GPU already runs
            # a batch across the device: parallel runs are a CPU setting.
            raise ValueError(f"parallel_runs > 1 is for provider 'cpu' only, not {provider!r}")
        if parallel_runs > 1 and threads is None:
            threads = max(1, len(os.sched_getaffinity(0)) // parallel_runs)
        self.manifest: Manifest = load_manifest(path, check_hashes=check_hashes)
        # None: the model's own truncate_dim (its sentence-transformers config's, recorded at export), if any
        self.truncate_dim = check_truncate_dim(truncate_dim if truncate_dim is not None else self.manifest.truncate_dim,
                                               self.manifest.dim)
        self.normalize_embeddings = bool(normalize_embeddings)
        if mode == "fixed":
            check_buckets(self.manifest.fixed_buckets, self.manifest.max_length)
        self.mode = mode
        self.provider = provider
        self.threads = threads
        self.max_batch_tokens = max_batch_tokens
        self.parallel_runs = parallel_runs
        self.cache: EmbeddingCache | None = EmbeddingCache(cache_size) if cache_size else None
        self.tokenizer = TextTokenizer(self.manifest, truncate=truncate)
        self.backend: Backend = load_backend(self.manifest, provider, threads)
        self._pending: deque[_Request] = deque()
        self._pending_lock = threading.Lock()
        self._run_lock = threading.Lock()
        # onnxruntime sessions take concurrent `run` calls; the pool's threads start on first use.
        self._pool = (ThreadPoolExecutor(parallel_runs, thread_name_prefix="stableembed-run")
                      if parallel_runs > 1 else None)

    def warm_up(self, batch_size: int = 32) -> Batch | None:
        """Run the largest batch `encode(..., batch_size)` can schedule, once, and return its shape.

        onnxruntime keeps the memory of the largest run it has seen (its CPU arena), so a server that
        never warmed up takes a step in RSS the first time such a batch arrives (README, Serving). In
        dynamic mode the largest run is max_length tokens long with as many rows as the token budget
        allows; in fixed mode, the bucket with the most rows × length². Nothing is done (None) when even
        one max_length row is over the token budget (long-context models: one such run is seconds and
        gigabytes, and their CPU sessions keep no arena). With `parallel_runs`, that many such runs at once.
        Results are not affected: no run changes another's."""
        if self.mode == "fixed":
            rows, length = max(self.manifest.fixed_buckets, key=lambda b: b[0] * b[1] * b[1])
        else:
            if self.max_length > self.max_batch_tokens:
                return None
            rows, length = min(batch_size, self.max_batch_tokens // self.max_length), self.max_length
        # Token ids spread evenly over the vocabulary: the run also reads the whole word-embedding table,
        # whose pages (memory-mapped from the weights file) real traffic would fault in over its first
        # requests. Any ids give the same activation sizes.
        vocab = self.tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)
        ids = np.linspace(0, vocab - 1, rows * length).astype(np.int64).reshape(rows, length)
        batch = Batch(indices=tuple(range(rows)), length=length, rows=rows)
        feeds = self.tokenizer.feeds([_Row(r.tolist(), [0] * length) for r in ids], batch)
        with self._run_lock:
            if self._pool is None:
                self.backend.run(feeds)
            else:  # as many at once as encode runs: each run holds its own activations in the arena
                for f in [self._pool.submit(self.backend.run, feeds) for _ in range(self.parallel_runs)]:
                    f.result()
        return batch

    @property
    def dim(self) -> int:
        """Width of the returned embeddings: `truncate_dim` when set, else the model's (manifest.dim)."""
        return self.truncate_dim or self.manifest.dim

    def _settings(self, truncate_dim: int | None, normalize: bool | None) -> tuple[int | None, bool]:
        """(width, normalize) for `finish_rows` from a call's arguments, None meaning the Encoder's own
        setting; a bad width raises here, before any text runs."""
        dim = self.truncate_dim if truncate_dim is None else check_truncate_dim(truncate_dim, self.manifest.dim)
        return dim, self.normalize_embeddings if normalize is None else bool(normalize)

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def plan(self, lengths: list[int], batch_size: int) -> list[Batch]:
        if self.mode == "fixed":
            return plan_fixed(lengths, self.manifest.fixed_buckets)
        return plan_dynamic(lengths, batch_size, self.max_batch_tokens)

    @property
    def prompts(self) -> dict[str, str]:
        """The prompts by name, as sentence-transformers' `prompts`: the model's, plus empty "query" and
        "document" where it sets none."""
        return model_prompts(self.manifest)

    @property
    def default_prompt_name(self) -> str | None:
        return self.manifest.default_prompt_name

    @overload
    def encode(self, texts: str, batch_size: int = ..., show_progress: bool = ..., *,
               prompt_name: str | None = ..., prompt: str | None = ..., truncate_dim: int | None = ...,
               normalize_embeddings: bool | None = ...) -> np.ndarray: ...
    @overload
    def encode(self, texts: Iterable[str], batch_size: int = ..., show_progress: bool = ..., *,
               prompt_name: str | None = ..., prompt: str | None = ..., truncate_dim: int | None = ...,
               normalize_embeddings: bool | None = ...) -> np.ndarray: ...

    def encode(self, texts, batch_size: int = 32, show_progress: bool = False, *,
               prompt_name: str | None = None, prompt: str | None = None, truncate_dim: int | None = None,
               normalize_embeddings: bool | None = None) -> np.ndarray:
        """Embed `texts` -> float32 [N, dim] in input order; a single str gives [dim].

        Prompts as sentence-transformers' `encode`: `prompt` (a string) goes before each text; else the
        model's prompt named `prompt_name`; else the model's default prompt, if it has one (`prompt=""`:
        none). An unknown `prompt_name` is a ValueError naming the known ones.
        `truncate_dim` / `normalize_embeddings`: as the Encoder's arguments of those names, for this call
        (None: the Encoder's setting).
        Raises TypeError / ValueError naming the index of a bad text; nothing else is affected.
        In fixed mode the manifest's buckets set the batch sizes and `batch_size` is not used.
        """
        chosen = resolve_prompt(self.manifest, prompt_name, prompt)
        settings = self._settings(truncate_dim, normalize_embeddings)
        single = isinstance(texts, str)
        out = finish_rows(self._encode([texts] if single else texts, batch_size, show_progress, chosen), *settings)
        return out[0] if single else out

    def _encode(self, texts: Iterable[str], batch_size: int, show_progress: bool, prompt: str | None) -> np.ndarray:
        """`encode` with the prompt already chosen (None: no prompt at all)."""
        check_batch_size(batch_size)
        items = check_texts(texts)
        out = np.empty((len(items), self.manifest.dim), dtype=np.float32)
        if not items:
            return out
        todo = range(len(items)) if self.cache is None else self.cache.lookup(prompt, items, out)
        if not todo:
            return out
        whole = len(todo) == len(items)
        missing = items if whole else [items[i] for i in todo]
        rows = out if whole else np.empty((len(missing), self.manifest.dim), dtype=np.float32)
        # Tokenize in the caller's thread: bad input fails here, alone, and tokenizing overlaps with
        # whatever batch another thread is running.
        with _naming_indices(todo.__getitem__):  # the index in the caller's list, not among the misses
            encodings = self.tokenizer.encode(missing, prompt=prompt)
        request = _Request(encodings, batch_size, rows, self.tokenizer.prompt_length(prompt))
        if show_progress:
            with self._run_lock:
                self._run([request], progress=True)
        else:
            self._submit(request)
        if request.error is not None:
            raise request.error
        if not whole:
            out[todo] = rows
        if self.cache is not None:
            self.cache.store(prompt, missing, rows)
        return out

    def encode_stream(self, texts: Iterable[str], chunk_size: int = 4096, batch_size: int = 32,
                      show_progress: bool = False, total: int | None = None, *, prompt_name: str | None = None,
                      prompt: str | None = None, truncate_dim: int | None = None,
                      normalize_embeddings: bool | None = None) -> Iterator[np.ndarray]:
        """Embed an iterable of any length chunk by chunk, yielding float32 [<=chunk_size, dim] arrays in
        order. Memory stays bounded by one chunk of texts and embeddings, whatever the input's length.
        `prompt_name` / `prompt`, `truncate_dim` / `normalize_embeddings` as in `encode` (an unknown name or
        a bad width raises before any text is read)."""
        if isinstance(texts, str):  # iterating it would embed each character
            raise TypeError("encode_stream takes an iterable of texts, not one str: use encode(text), or wrap it "
                            "in a list")
        check_chunk_size(chunk_size)
        chosen = resolve_prompt(self.manifest, prompt_name, prompt)
        self._settings(truncate_dim, normalize_embeddings)  # a bad width fails before any text is read
        return self._stream(texts, chunk_size, batch_size, show_progress, total, chosen, truncate_dim,
                            normalize_embeddings)

    def _stream(self, texts: Iterable[str], chunk_size: int, batch_size: int, show_progress: bool,
                total: int | None, prompt: str | None, truncate_dim: int | None = None,
                normalize: bool | None = None) -> Iterator[np.ndarray]:
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, unit="text", desc="embedding")
        iterator, offset = iter(texts), 0
        try:
            while chunk := list(itertools.islice(iterator, chunk_size)):
                yield self._encode_chunk(chunk, offset, batch_size, prompt, truncate_dim, normalize)
                offset += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            if progress is not None:
                progress.close()

    def _encode_chunk(self, chunk: list[str], offset: int, batch_size: int, prompt: str | None,
                      truncate_dim: int | None = None, normalize: bool | None = None) -> np.ndarray:
        """One chunk of a stream, finished with the given (None: the Encoder's) truncate_dim and normalize."""
        with _naming_indices(lambda i: offset + i):  # the index in the whole stream, not in the chunk
            return finish_rows(self._encode(chunk, batch_size, False, prompt), *self._settings(truncate_dim, normalize))

    def _submit(self, request: _Request) -> None:
        """Flat combining: whoever holds the run lock runs every pending request's texts as shared
        batches; the others wait for their results or take the lock for the next round."""
        with self._pending_lock:
            self._pending.append(request)
        try:
            while not request.done.is_set():
                if self._run_lock.acquire(timeout=0.05):
                    try:
                        if request.done.is_set():  # answered by the round that just ended: leave the next to others
                            return
                        self._run_round(request)
                    finally:
                        self._run_lock.release()
        except BaseException:
            # Interrupted (KeyboardInterrupt in this thread) while waiting: withdraw the request, so that no
            # later round computes texts nobody will read.
            with self._pending_lock:
                if request in self._pending:
                    self._pending.remove(request)
            raise

    def _run_round(self, own: _Request) -> None:
        """Take every pending request and run them (the run lock held). An exception of the backend goes
        to every request taken; an interruption of this thread (KeyboardInterrupt, SystemExit) is this
        caller's alone: the other requests go back to the queue, unanswered, for their own threads."""
        taken: deque[_Request] = deque()
        try:
            with self._pending_lock:
                taken, self._pending = self._pending, taken  # a swap, no call between the stores
            if taken:
                self._run(list(taken))
        except Exception:
            raise  # `_run` answered every request taken with it
        except BaseException:
            back = [r for r in taken if r is not own and not r.done.is_set()]
            with self._pending_lock:
                self._pending.extendleft(reversed(back))
            raise

    def _run(self, requests: list[_Request], progress: bool = False) -> None:
        """Run `requests` as shared batches and answer each (`done`, with its rows or `error`). On an
        interruption (a BaseException that is not an Exception) the requests are left unanswered."""
        bar = None
        futures: list[Future] = []
        finished = False
        try:
            # Requests with different prompts share batches: each row carries its own prompt length.
            encodings, prompt_lengths, owners = _distinct_rows(requests)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=sum(len(r.encodings) for r in requests), unit="text", desc="embedding")
            plan = self.plan([len(e.ids) for e in encodings], min(r.batch_size for r in requests))
            if self._pool is not None and len(plan) > 1:
                # All submitted at once; the pool keeps parallel_runs in flight. Each batch builds its own
                # feeds in its worker; results are taken in plan order, so a failure surfaces here.
                futures = [self._pool.submit(self._run_batch, encodings, b, prompt_lengths) for b in plan]
                results = (f.result() for f in futures)
            else:
                results = (self._run_batch(encodings, b, prompt_lengths) for b in plan)
            for batch, result in zip(plan, results):
                for row, idx in enumerate(batch.indices):
                    for req, i in owners[idx]:
                        req.out[i] = result[row]
                if bar is not None:
                    bar.update(sum(len(owners[idx]) for idx in batch.indices))
            finished = True
        except Exception as exc:  # the backend failed: every request in this round gets the error
            for r in requests:  # first, before any wait below can be interrupted
                r.error = exc
            raise
        finally:
            for f in futures:  # batches not started yet are dropped; running ones finish unread
                f.cancel()
            try:
                for f in futures:
                    if not f.cancelled():
                        f.exception()  # wait: no run of this round outlives it
            finally:
                if bar is not None:
                    bar.close()
                for r in requests:  # answered: with all its rows, or with the error; never half-written
                    if finished or r.error is not None:
                        r.done.set()

    def _run_batch(self, encodings: list[Encoding], batch: Batch, prompt_lengths: list[int]) -> np.ndarray:
        return self.backend.run(self.tokenizer.feeds(encodings, batch, prompt_lengths))

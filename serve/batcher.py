"""Dynamic batching across concurrent requests, on the event loop.

Requests are cut into segments of at most `max_dispatch_tokens` tokens and `max_dispatch_texts` texts
and queued in arrival order. A dispatcher task waits for a free worker, then gathers segments until the next
one would pass the token or text budget, or until the oldest waiting segment has waited `max_wait`
seconds (or at once, when the server reports no other request on its way), and runs the gathered texts
as one `Encoder.encode` call in a worker thread (`run_in_executor`), so the event loop keeps accepting
and answering requests meanwhile. While the worker is busy, requests pile up in the queue and the next
batch takes them all (up to the budgets): under load, batches grow by themselves.

Merging texts of different requests into one call is safe because the Encoder's output for a text is
bit-identical whatever batch it is in: a response equals what `Encoder.encode` gives for the same texts
offline.

The queue is bounded in texts and in tokens: `submit` raises `QueueFull` at once instead of growing it
(the server answers 429). After `close()` new work raises `Closed` (503) while everything already queued
is still encoded, which is how a graceful shutdown finishes in-flight requests. A cancelled `submit`
(its client disconnected) takes its waiting segments out of the queue: they are never encoded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import Metrics


class QueueFull(Exception):
    """The bounded queue has no room for this request now; retry later."""


class Closed(Exception):
    """The batcher is shutting down (or not started) and takes no new work."""


@dataclass
class _Job:
    """One request: its output array fills in as its segments complete."""

    out: np.ndarray
    future: asyncio.Future
    remaining: int


@dataclass
class _Segment:
    job: _Job
    start: int  # row offset in job.out
    texts: list[str]
    tokens: int
    prompt: str | None = None  # put before each text (None: no prompt argument, the encoder's default)
    enqueued: float = field(default_factory=time.monotonic)


def _segments(tokens: Sequence[int], max_tokens: int, max_texts: int) -> list[tuple[int, int, int]]:
    """(start, end, tokens) ranges of consecutive texts, each within both budgets (a single text over
    the token budget makes a segment of its own)."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(tokens):
        if i > start and (acc + n > max_tokens or i - start >= max_texts):
            out.append((start, i, acc))
            start, acc = i, 0
        acc += n
    if start < len(tokens):
        out.append((start, len(tokens), acc))
    return out


class Batcher:
    """Gathers concurrent requests' texts into shared `encoder.encode` calls.

    Args:
        encoder: anything with `encode(texts, batch_size=...) -> float32 [N, dim]` and `dim` (and a `prompt`
            keyword when requests carry prompts).
        max_dispatch_tokens: token budget of one dispatched batch, one `encoder.encode` call (tokens after
            truncation, unpadded; the Encoder cuts the call into model runs of its own max_batch_tokens).
        max_dispatch_texts: text budget of one dispatched batch.
        max_wait: seconds the oldest waiting segment may wait for companions before its batch runs
            anyway (when a worker is free).
        max_queue_texts, max_queue_tokens: bounds of the waiting queue; beyond them `submit` raises
            `QueueFull`.
        batch_size: the `batch_size` passed to `encoder.encode`.
        workers: batches encoded at the same time (threads). One is right on CPU, where one batch
            already uses every core.
        arriving: optional count of requests accepted but not yet submitted (the server passes the
            requests whose bodies it is still reading or tokenizing). When given, a free worker waits
            for companions only while that count is positive: with nobody on the way, waiting would
            only add latency.
    """

    def __init__(self, encoder: Any, *, max_dispatch_tokens: int = 4096, max_dispatch_texts: int = 256,
                 max_wait: float = 0.005, max_queue_texts: int = 8192, max_queue_tokens: int = 1 << 20,
                 batch_size: int = 32, workers: int = 1, metrics: Metrics | None = None,
                 arriving: Callable[[], int] | None = None):
        for name, value in (("max_dispatch_tokens", max_dispatch_tokens), ("max_dispatch_texts", max_dispatch_texts),
                            ("max_queue_texts", max_queue_texts), ("max_queue_tokens", max_queue_tokens),
                            ("batch_size", batch_size), ("workers", workers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.encoder = encoder
        self.max_dispatch_tokens = max_dispatch_tokens
        self.max_dispatch_texts = max_dispatch_texts
        self.max_wait = max_wait
        self.max_queue_texts = max_queue_texts
        self.max_queue_tokens = max_queue_tokens
        self.batch_size = batch_size
        self.workers = workers
        self.metrics = metrics if metrics is not None else Metrics()
        self.arriving = arriving
        self.queued_texts = 0
        self.queued_tokens = 0
        self.running = 0  # batches being encoded
        self._queue: deque[_Segment] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()
        self._closing = True  # until start()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher on the running event loop."""
        if self._task is not None:
            raise RuntimeError("the batcher is already started")
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="stableembed-encode")
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="stableembed-batcher")

    @property
    def accepting(self) -> bool:
        return not self._closing and self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Take no new work, encode everything queued, wait for running batches, stop the threads."""
        self._closing = True
        if self._task is None:
            return
        self._wakeup.set()
        try:
            await self._task
        finally:
            if self._batch_tasks:
                await asyncio.gather(*self._batch_tasks, return_exceptions=True)
            self._executor.shutdown(wait=True)

    # -- requests ----------------------------------------------------------------------------------

    def arrival_ended(self) -> None:
        """A request counted by `arriving` ended without submitting (refused, disconnected): queued work
        waiting for companions need not wait for it any longer."""
        if self._wakeup is not None:
            self._wakeup.set()

    def check_fits(self, n_texts: int, n_tokens: int) -> None:
        """ValueError if a request this large could never be queued, whatever the load."""
        if n_texts > self.max_queue_texts:
            raise ValueError(f"{n_texts} texts in one request; this server queues at most {self.max_queue_texts}")
        if n_tokens > self.max_queue_tokens:
            raise ValueError(f"{n_tokens} tokens in one request; this server queues at most "
                             f"{self.max_queue_tokens}")

    async def submit(self, texts: Sequence[str], tokens: Sequence[int], prompt: str | None = None) -> np.ndarray:
        """Embed `texts` (whose token counts are `tokens`, the prompt's included) -> float32 [N, dim], sharing
        batches with other requests; `prompt` is passed to `encoder.encode` when not None. Raises QueueFull
        when the queue has no room, Closed when shutting down."""
        if not self.accepting:
            raise Closed("the server is shutting down")
        if len(texts) != len(tokens):
            raise ValueError("texts and tokens differ in length")
        total = int(sum(tokens))
        self.check_fits(len(texts), total)
        if (self.queued_texts + len(texts) > self.max_queue_texts
                or self.queued_tokens + total > self.max_queue_tokens):
            raise QueueFull(f"the queue is full ({self.queued_texts} texts, {self.queued_tokens} tokens waiting)")
        loop = asyncio.get_running_loop()
        job = _Job(np.empty((len(texts), self.encoder.dim), dtype=np.float32), loop.create_future(), 0)
        if not texts:
            return job.out
        texts = list(texts)
        parts = _segments(tokens, self.max_dispatch_tokens, self.max_dispatch_texts)
        job.remaining = len(parts)
        for start, end, n in parts:
            self._queue.append(_Segment(job, start, texts[start:end], n, prompt))
        self._account(len(texts), total, len(parts))
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller is gone (its client disconnected): free the queue now
            self._forget(job)
            raise

    def _forget(self, job: _Job) -> None:
        """Take a cancelled request's segments out of the queue, so they are never encoded and the queue's
        bounds count only live work (segments already in a running batch finish with it)."""
        gone = [seg for seg in self._queue if seg.job is job]
        if gone:
            self._queue = deque(seg for seg in self._queue if seg.job is not job)
            self._account(-sum(len(s.texts) for s in gone), -sum(s.tokens for s in gone), -len(gone))

    def _account(self, texts: int, tokens: int, segments: int) -> None:
        self.queued_texts += texts
        self.queued_tokens += tokens
        m = self.metrics
        m.queue_texts.set(self.queued_texts)
        m.queue_tokens.set(self.queued_tokens)
        m.queue_depth.inc(segments)

    # -- dispatch ----------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].job.future.done():  # its request is gone (cancelled)
            seg = self._queue.popleft()
            self._account(-len(seg.texts), -seg.tokens, -1)

    async def _dispatch(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            try:
                # Wait for companions: until the budget is reached or the oldest has waited max_wait.
                while not self._closing:
                    self._drop_cancelled()
                    if not self._queue:
                        break
                    if (self.queued_tokens >= self.max_dispatch_tokens
                            or self.queued_texts >= self.max_dispatch_texts):
                        break
                    if self.arriving is not None and self.arriving() <= 0:
                        break
                    timeout = self._queue[0].enqueued + self.max_wait - time.monotonic()
                    if timeout <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                    except asyncio.TimeoutError:
                        break
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    def _take(self) -> list[_Segment]:
        batch: list[_Segment] = []
        texts = tokens = 0
        now = time.monotonic()
        while self._queue:
            seg = self._queue[0]
            if seg.job.future.done():
                self._queue.popleft()
                self._account(-len(seg.texts), -seg.tokens, -1)
                continue
            if batch and (tokens + seg.tokens > self.max_dispatch_tokens
                          or texts + len(seg.texts) > self.max_dispatch_texts):
                break
            self._queue.popleft()
            self._account(-len(seg.texts), -seg.tokens, -1)
            self.metrics.queue_wait.observe(now - seg.enqueued)
            batch.append(seg)
            texts += len(seg.texts)
            tokens += seg.tokens
        if batch:
            m = self.metrics
            m.batch_texts.observe(texts)
            m.batch_tokens.observe(tokens)
            m.batch_requests.observe(len({id(s.job) for s in batch}))
        return batch

    def _encode(self, batch: list[_Segment]) -> np.ndarray:
        """The batch's embeddings in segment order: one `encode` call per distinct prompt (usually one)."""
        groups: dict[str | None, list[int]] = {}
        texts: list[str] = []
        for seg in batch:
            groups.setdefault(seg.prompt, []).extend(range(len(texts), len(texts) + len(seg.texts)))
            texts += seg.texts
        if len(groups) == 1:
            ((prompt, _),) = groups.items()
            return self.encoder.encode(texts, batch_size=self.batch_size,
                                       **({} if prompt is None else {"prompt": prompt}))
        emb = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        for prompt, rows in groups.items():
            emb[rows] = self.encoder.encode([texts[i] for i in rows], batch_size=self.batch_size,
                                            **({} if prompt is None else {"prompt": prompt}))
        return emb

    async def _run(self, batch: list[_Segment]) -> None:
        loop = asyncio.get_running_loop()
        self.running += 1
        self.metrics.batches_running.inc()
        t0 = time.perf_counter()
        try:
            emb = await loop.run_in_executor(self._executor, self._encode, batch)
        except BaseException as exc:  # every request in the batch gets the error
            for seg in batch:
                if not seg.job.future.done():
                    seg.job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)
            row = 0
            for seg in batch:
                n = len(seg.texts)
                job = seg.job
                if not job.future.done():
                    job.out[seg.start:seg.start + n] = emb[row:row + n]
                    job.remaining -= 1
                    if job.remaining == 0:
                        job.future.set_result(job.out)
                row += n
        finally:
            self.running -= 1
            self.metrics.batches_running.dec()
            self._slots.release()
            self._wakeup.set()

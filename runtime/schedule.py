"""Batch planning: which texts run together, at which padded shape. Pure functions over token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Batch:
    """Rows `indices` (into the input) padded to `length`; `rows` >= len(indices) adds filler rows."""

    indices: tuple[int, ...]
    length: int
    rows: int


# Cost model for cutting length-sorted texts into batches, in token-equivalents: a batch costs its
# padded size, but never less than SMALL_BATCH_TOKENS (a tiny GEMM runs far below peak), plus a fixed
# per-run overhead. Results never depend on how texts are batched, so any cut is safe.
SMALL_BATCH_TOKENS = 512
RUN_OVERHEAD_TOKENS = 16


def plan_dynamic(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[Batch]:
    """Sort by length (longest first) and cut into batches of at most `batch_size` texts and at most
    `max_tokens` padded tokens (a single text always runs), choosing the cuts that minimize the total
    padded work by dynamic programming: a long text no longer pads a batch of short ones."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sizes = [int(lengths[i]) for i in order]
    n = len(sizes)
    best = [0.0] + [float("inf")] * n  # best[k]: least cost of the first k sorted texts
    cut = [0] * (n + 1)
    for j in range(n):  # a batch starting at j is padded to sizes[j], the longest in it
        longest = sizes[j]
        cap = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(longest, 1)))
        base = best[j] + RUN_OVERHEAD_TOKENS
        for rows in range(1, min(n - j, cap) + 1):
            cost = base + max(rows * longest, SMALL_BATCH_TOKENS)
            if cost < best[j + rows]:
                best[j + rows], cut[j + rows] = cost, j
    out: list[Batch] = []
    k = n
    while k > 0:
        j = cut[k]
        out.append(Batch(tuple(order[j:k]), sizes[j], k - j))
        k = j
    return out[::-1]


def check_buckets(buckets: Sequence[Sequence[int]], max_length: int) -> None:
    """ValueError unless the fixed buckets' lengths reach max_length and none goes beyond it: texts are
    truncated to max_length, and the graph's pooling trees are built that deep, no deeper."""
    for b, t in buckets:  # a bucket of no rows would plan batches of no texts, for ever
        if int(b) < 1 or int(t) < 1:
            raise ValueError(f"fixed bucket {b}x{t} must have at least one row and one token")
    lengths = [int(t) for _, t in buckets]
    if not lengths or max(lengths) < max_length:
        raise ValueError(f"fixed buckets must include the length max_length ({max_length})")
    if max(lengths) > max_length:
        raise ValueError(f"fixed bucket length {max(lengths)} is beyond max_length ({max_length})")


def bucket_length(n_tokens: int, lengths: Sequence[int]) -> int:
    """The smallest bucket length that holds `n_tokens` tokens."""
    for t in sorted(lengths):
        if t >= n_tokens:
            return t
    raise ValueError(f"a text of {n_tokens} tokens fits no fixed bucket (largest: {max(lengths)})")


def plan_fixed(lengths: Sequence[int], buckets: Sequence[tuple[int, int]]) -> list[Batch]:
    """Each text to the smallest length bucket holding it; per length, full batches of the largest batch
    size, then the remainder in the smallest batch size that holds it (padded with filler rows), split
    further only when no batch size does."""
    sizes: dict[int, list[int]] = {}
    for b, t in buckets:
        sizes.setdefault(t, []).append(b)
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bucket_length(n, list(sizes)), []).append(i)
    out = []
    for t in sorted(groups, reverse=True):
        idx, avail = groups[t], sorted(sizes[t])
        while idx:
            fits = [b for b in avail if b >= len(idx)]
            rows = fits[0] if fits else avail[-1]
            take, idx = idx[:rows], idx[rows:]
            out.append(Batch(tuple(take), t, rows))
    return out

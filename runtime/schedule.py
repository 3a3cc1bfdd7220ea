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


def plan_dynamic(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[Batch]:
    """Longest first; a batch closes at `batch_size` texts or when its padded size (rows x its longest
    text) would pass `max_tokens`; each batch is padded to its own longest text."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[Batch] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]  # sorted: the first text is the batch's longest
        rows = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(longest, 1)))
        idx = tuple(order[start:start + rows])
        out.append(Batch(idx, longest, len(idx)))
        start += rows
    return out


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

"""An exact embedding cache: a thread-safe LRU of embeddings keyed by (prompt, text), one per Encoder.

Exact, not approximate: a text's embedding does not depend on the batch it ran in (the stability
guarantee), so a hit returns the very bits computing the text again would give, on the same Encoder
(one artifact, provider and mode). Entries hold the text itself and one float32 row each.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CacheInfo:
    """Counts since the cache was made or cleared, as functools.lru_cache reports them."""

    hits: int
    misses: int
    size: int
    capacity: int


class EmbeddingCache:
    """Least-recently-used embeddings, at most `capacity` of them."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[tuple[str | None, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def lookup(self, prompt: str | None, texts: Sequence[str], out: np.ndarray) -> list[int]:
        """Copy every cached text's embedding into its row of `out`; return the indices of the others."""
        missing = []
        with self._lock:
            for i, text in enumerate(texts):
                row = self._rows.get((prompt, text))
                if row is None:
                    missing.append(i)
                else:
                    self._rows.move_to_end((prompt, text))
                    out[i] = row
            self._hits += len(texts) - len(missing)
            self._misses += len(missing)
        return missing

    def store(self, prompt: str | None, texts: Sequence[str], rows: np.ndarray) -> None:
        """Remember `rows[i]` as the embedding of `texts[i]`; the oldest entries go beyond capacity."""
        with self._lock:
            for text, row in zip(texts, rows):
                kept = row.copy()  # the caller owns `rows`: later writes to it must not reach the cache
                kept.flags.writeable = False
                self._rows[(prompt, text)] = kept
                self._rows.move_to_end((prompt, text))
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._rows), self.capacity)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._hits = self._misses = 0

"""A text's bits at explicit rows and paddings, at the backend: batches built row by row here, so no
scheduler can reorder them (through `encode`, the planner sorts by length and a probe lands where it likes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stableembed import Encoder
from stableembed.runtime.schedule import Batch
from stableembed.runtime.verify import same_bits


def assert_rows_and_paddings(artifact: Path, texts: list[str], threads: int) -> int:
    """A short probe and one that fills max_length, at the first, middle and last row of batches of
    companions of other token lengths, padded to the batch's longest text and beyond (up to max_length),
    with and without filler rows: each the same bits as the probe run alone at its own length. Returns
    how many placements were checked."""
    enc = Encoder(artifact, threads=threads, check_hashes=False)
    tok, backend = enc.tokenizer, enc.backend
    encodings = tok.encode(texts)
    n_tokens = [len(e.ids) for e in encodings]

    def run(indices: list[int], length: int, rows: int | None = None) -> np.ndarray:
        return backend.run(tok.feeds(encodings, Batch(tuple(indices), length, rows or len(indices))))

    by_length = sorted(range(len(texts)), key=lambda i: n_tokens[i])
    companions = by_length[::len(by_length) // 12][:12]  # 12 texts from the shortest to the longest
    probes = [by_length[len(by_length) // 4], by_length[-1]]  # a short text and one that fills max_length
    checked = 0
    for probe in probes:
        alone = run([probe], n_tokens[probe])[0]
        for length in (n_tokens[probe] + 1, 64, enc.max_length):
            if n_tokens[probe] < length <= enc.max_length:
                assert same_bits(run([probe], length)[0], alone).all(), (probe, length)
                checked += 1
        for group in (companions[:3], companions):
            others = [i for i in group if i != probe]
            longest = max(n_tokens[i] for i in others + [probe])
            for pos in (0, len(others) // 2, len(others)):
                rows = others[:pos] + [probe] + others[pos:]
                for length in sorted({longest, min(longest + 17, enc.max_length), enc.max_length}):
                    out = run(rows, length, rows=len(rows) + (2 if length == longest else 0))
                    assert same_bits(out[pos], alone).all(), (probe, pos, length, len(rows))
                    checked += 1
    return checked

"""The exact embedding cache (Encoder cache_size, runtime/cache.py): hits are the bits a run gives, skip
the model, keep the caller's order, evict least recently used first, key on the prompt too, and stay
exact under concurrent callers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.runtime.cache import CacheInfo, EmbeddingCache
from stableembed.runtime.verify import same_bits


def _counting(enc: Encoder) -> list[int]:
    """Record the rows each backend run computes (filler rows of fixed mode included)."""
    inner, rows = enc.backend.run, []

    def run(feeds):
        rows.append(feeds["input_ids"].shape[0])
        return inner(feeds)

    enc.backend.run = run  # type: ignore[method-assign]
    return rows


@pytest.fixture(scope="module")
def texts(real_texts) -> list[str]:
    return list(dict.fromkeys(t for t in real_texts if 0 < len(t) < 300))[:40]


@pytest.fixture(scope="module")
def alone(minilm_artifact, texts) -> np.ndarray:
    enc = Encoder(minilm_artifact, check_hashes=False)
    return np.stack([enc.encode(t) for t in texts])


def test_hits_skip_the_model_and_keep_the_bits_and_order(minilm_artifact, texts, alone) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=8)
    rows = _counting(enc)
    first = enc.encode(texts[:3])
    assert sum(rows) == 3 and same_bits(first, alone[:3]).all()
    rows.clear()
    again = enc.encode(texts[:3][::-1])
    assert rows == [] and same_bits(again, alone[:3][::-1]).all()
    # a mix of hits and misses: only the misses run, every row lands where the caller put its text
    mixed = enc.encode([texts[1], texts[5], texts[0], texts[6], texts[5]])
    assert sum(rows) == 2  # texts 5 and 6; the repeated 5 runs once
    assert same_bits(mixed, alone[[1, 5, 0, 6, 5]]).all()
    assert enc.cache.info() == CacheInfo(hits=3 + 2, misses=3 + 3, size=5, capacity=8)
    # what the caller gets is its own: writing to it does not reach the cache
    again[:] = 0
    assert same_bits(enc.encode(texts[0]), alone[0]).all()
    enc.cache.clear()
    assert enc.cache.info() == CacheInfo(0, 0, 0, 8)
    rows.clear()
    enc.encode(texts[0])
    assert sum(rows) == 1


def test_least_recently_used_goes_first(minilm_artifact, texts, alone) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=2)
    rows = _counting(enc)
    a, b, c = texts[:3]
    enc.encode([a])
    enc.encode([b])
    enc.encode([a])  # a is now the most recent: b goes when c comes
    enc.encode([c])
    rows.clear()
    assert same_bits(enc.encode([a, c]), alone[[0, 2]]).all() and rows == []
    assert same_bits(enc.encode(b), alone[1]).all() and sum(rows) == 1


def test_the_prompt_is_part_of_the_key(minilm_artifact, texts) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=8)
    plain, prompted = enc.encode(texts[0]), enc.encode(texts[0], prompt="query: ")
    assert not same_bits(plain, prompted).all()
    rows = _counting(enc)
    assert same_bits(enc.encode(texts[0]), plain).all()
    assert same_bits(enc.encode(texts[0], prompt="query: "), prompted).all()
    assert rows == []


def test_bad_input_names_the_callers_index_and_nothing_is_cached_from_it(minilm_artifact, texts) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=8, truncate=False)
    enc.encode(texts[:2])
    too_long = "word " * 400
    with pytest.raises(ValueError, match="text at index 3 is longer than max_length"):
        enc.encode([texts[0], texts[2], texts[1], too_long])  # two hits before it: it is miss 1
    with pytest.raises(TypeError, match="text at index 2 is int"):
        enc.encode([texts[0], texts[1], 7])
    assert enc.cache.info().size == 2  # texts[2] was in the failed call: not run, not cached


def test_concurrent_callers_get_exact_bits(minilm_artifact, texts, alone) -> None:
    enc = Encoder(minilm_artifact, threads=2, check_hashes=False, cache_size=16)  # smaller than the texts

    def worker(k: int) -> list[str]:
        bad = []
        for j in range(60):
            picks = [(k * 7 + j * 3 + d) % len(texts) for d in range(3)]
            if not same_bits(enc.encode([texts[i] for i in picks]), alone[picks]).all():
                bad.append(f"thread {k} call {j}")
        return bad

    with ThreadPoolExecutor(4) as pool:
        results = [f.result(timeout=600) for f in [pool.submit(worker, k) for k in range(4)]]
    assert results == [[]] * 4
    info = enc.cache.info()
    assert info.size == 16 and info.hits > 0 and info.hits + info.misses == 4 * 60 * 3


def test_arguments() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        EmbeddingCache(0)


def test_negative_cache_size_is_refused(minilm_artifact) -> None:
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        Encoder(minilm_artifact, check_hashes=False, cache_size=-1)
    assert Encoder(minilm_artifact, check_hashes=False).cache is None

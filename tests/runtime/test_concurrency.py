"""Many threads on one Encoder: results bit-identical to the serial ones, no deadlock, and a failing
request does not disturb the requests it would have shared a batch with. Streaming and huge inputs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.runtime.verify import same_bits

THREADS, CALLS = 8, 500


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact, threads=2, check_hashes=False)


def test_threads_share_batches_without_changing_bits(enc, real_texts) -> None:
    texts = real_texts[:100]
    serial = np.stack([enc.encode(t) for t in texts])
    failures: list[str] = []
    errors_seen = [0]

    def worker(k: int) -> None:
        for j in range(CALLS):
            i = (k * 37 + j * 11) % len(texts)
            if j % 50 == 7:  # a bad request among the good ones
                try:
                    enc.encode([texts[i], None])
                except TypeError:
                    errors_seen[0] += 1
                    continue
                failures.append("bad input accepted")
            if j % 3 == 0:
                got = enc.encode([texts[i], texts[(i + 1) % len(texts)]])
                ok = same_bits(got[0], serial[i]).all() and same_bits(got[1], serial[(i + 1) % len(texts)]).all()
            else:
                ok = same_bits(enc.encode(texts[i]), serial[i]).all()
            if not ok:
                failures.append(f"thread {k} call {j} text {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert failures == []
    assert errors_seen[0] == THREADS * (CALLS // 50)


def test_stream_matches_encode_and_names_global_index(enc, real_texts) -> None:
    texts = real_texts[:50]
    chunks = list(enc.encode_stream(iter(texts), chunk_size=16))
    assert [len(c) for c in chunks] == [16, 16, 16, 2]
    assert same_bits(np.concatenate(chunks), enc.encode(texts)).all()
    with pytest.raises(TypeError, match="index 37"):
        list(enc.encode_stream(iter(texts[:37] + [None]), chunk_size=16))


def test_huge_text_is_truncated_in_bounded_time(enc, real_texts) -> None:
    paragraph = " ".join(t for t in real_texts if len(t) > 200)
    huge = (paragraph + " ") * (1_000_000 // len(paragraph) + 1)
    start = time.perf_counter()
    v = enc.encode(huge)
    assert time.perf_counter() - start < 5.0  # tokenizing all of it takes seconds; the prefix, milliseconds
    assert same_bits(v, enc.encode(huge[:20_000])).all()  # same first 256 tokens
    enc.tokenizer.tokenizer.enable_truncation(enc.max_length)
    assert enc.tokenizer.encode([huge])[0].ids == enc.tokenizer.tokenizer.encode(huge).ids


def test_refuse_instead_of_truncate(minilm_artifact) -> None:
    strict = Encoder(minilm_artifact, truncate=False, check_hashes=False)
    assert strict.encode(["short enough"]).shape == (1, 384)
    with pytest.raises(ValueError, match="index 1 is longer than max_length"):
        strict.encode(["fine", "word " * 400])
    with pytest.raises(ValueError, match="index 0 is longer than max_length"):
        strict.encode(["word " * 300_000])

"""The guarantee, on the real all-MiniLM-L6-v2 and real texts, compared bit for bit (uint32 views):
alone == any batch, any position, any companions, dynamic or fixed, 1 or 2 threads, parallel runs, fresh
process.

`Encoder.encode` sorts texts by length (dynamic mode) or groups them by bucket (fixed mode) before
batching, so where a text lands is the scheduler's choice, not the caller's: rows and paddings are also
tested below the scheduler, by building batches with the tokenizer's feeds and running the backend.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from backend_rows import assert_rows_and_paddings

from stableembed import Encoder
from stableembed.runtime.verify import check_stability, same_bits


@pytest.fixture(scope="module")
def alone(minilm_artifact, real_texts):
    enc = Encoder(minilm_artifact, threads=1)
    return np.stack([enc.encode(t) for t in real_texts])


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batches_positions_companions(minilm_artifact, real_texts, alone, mode, threads) -> None:
    enc = Encoder(minilm_artifact, mode=mode, threads=threads, check_hashes=False)
    rng = random.Random(threads)
    for batch_size in (1, 3, 16, 64):
        order = list(range(len(real_texts)))
        rng.shuffle(order)
        out = np.empty_like(alone)
        out[order] = enc.encode([real_texts[i] for i in order], batch_size=batch_size)
        assert same_bits(out, alone).all(), f"{mode}, {threads} threads, batch {batch_size}"


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_parallel_runs(minilm_artifact, real_texts, alone, mode) -> None:
    """Two batches in flight at once on one session (one intra-op thread each): the same bits."""
    enc = Encoder(minilm_artifact, mode=mode, threads=1, parallel_runs=2, check_hashes=False)
    rng = random.Random(7)
    for batch_size in (1, 16):
        order = list(range(len(real_texts)))
        rng.shuffle(order)
        assert len(enc.plan([len(e.ids) for e in enc.tokenizer.encode(real_texts)], batch_size)) > 2
        out = np.empty_like(alone)
        out[order] = enc.encode([real_texts[i] for i in order], batch_size=batch_size)
        assert same_bits(out, alone).all(), f"{mode}, parallel runs, batch {batch_size}"


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_and_paddings_at_the_backend(minilm_artifact, real_texts, threads) -> None:
    assert assert_rows_and_paddings(minilm_artifact, real_texts, threads) >= 20


def test_companions_of_every_length_through_encode(minilm_artifact, real_texts, alone) -> None:
    """One probe text next to companions from 1 to 256 tokens, given to `encode` at the front, middle and
    end of the list (where it lands in a batch is the scheduler's choice; the backend test above fixes
    rows and paddings explicitly)."""
    enc = Encoder(minilm_artifact, check_hashes=False)
    probe_idx = min(range(len(real_texts)), key=lambda i: len(real_texts[i]) if real_texts[i] else 99)
    probe = real_texts[probe_idx]
    for companions in ([real_texts[-1]], real_texts[:5], real_texts[5:40]):
        for pos in (0, len(companions) // 2, len(companions)):
            batch = companions[:pos] + [probe] + companions[pos:]
            out = enc.encode(batch, batch_size=len(batch))
            assert same_bits(out[pos], alone[probe_idx]).all()


def test_duplicates_and_repeated_calls(minilm_artifact, real_texts, alone) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False)
    out = enc.encode([real_texts[0]] * 5 + [real_texts[1]] * 3)
    assert same_bits(out[:5], alone[0]).all() and same_bits(out[5:], alone[1]).all()
    assert same_bits(enc.encode(real_texts[:10]), enc.encode(real_texts[:10])).all()


def test_fresh_process_and_verify_report(minilm_artifact, real_texts) -> None:
    report = check_stability(minilm_artifact, real_texts[:40], fresh_process=True)
    assert report.texts == 40 and len(report.results) == 10
    assert report.ok, report.results


def test_a_fresh_process_that_cannot_run_is_an_error_not_a_verdict(minilm_artifact, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    """A child that dies (here: cannot import stableembed) is reported as such: exit status 2 and its last
    error line, not a traceback with exit status 1, which `verify` gives for a failed guarantee."""
    from stableembed.cli import main
    from stableembed.runtime import verify

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'stableembed'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(verify.sys, "executable", str(broken))
    assert main(["verify", str(minilm_artifact), "one text", "another"]) == 2
    err = capsys.readouterr().err
    assert "fresh-process check could not run (exit status 1): ModuleNotFoundError: No module named" in err

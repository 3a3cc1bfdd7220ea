"""`truncate_dim` and `normalize_embeddings` (sentence-transformers' names): what they return, exactly,
and that a finished row still depends on its text alone. Parity with sentence-transformers is in
test_parity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stableembed import Encoder
from stableembed.cli import main
from stableembed.kernels.normalize import normalize_reference
from stableembed.runtime.encoder import finish_rows
from stableembed.runtime.verify import same_bits
from stableembed.streaming import embed_file


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact, check_hashes=False)


@pytest.fixture(scope="module")
def texts(real_texts):
    return real_texts[:40]


@pytest.mark.parametrize("k", [1, 64, 383, 384])
def test_rows_are_the_full_rows_prefix_then_normalized(enc, texts, k) -> None:
    full = enc.encode(texts)
    cut = enc.encode(texts, truncate_dim=k)
    assert cut.shape == (len(texts), k) and cut.dtype == np.float32 and cut.flags.c_contiguous
    assert same_bits(cut, full[:, :k]).all()
    unit = enc.encode(texts, truncate_dim=k, normalize_embeddings=True)
    assert same_bits(unit, normalize_reference(full[:, :k])).all()
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    one = enc.encode(texts[3], truncate_dim=k, normalize_embeddings=True)
    assert one.shape == (k,) and same_bits(one, unit[3]).all()


def test_finished_rows_do_not_depend_on_the_batch(enc, texts) -> None:
    """Each text alone against the same text among shuffled companions of other lengths, in dynamic
    batches of several sizes: the truncated, normalized rows are bit-identical."""
    alone = np.stack([enc.encode(t, truncate_dim=48, normalize_embeddings=True) for t in texts])
    rng = np.random.default_rng(0)
    for batch_size in (1, 5, 32):
        order = rng.permutation(len(texts))
        got = enc.encode([texts[i] for i in order], batch_size=batch_size, truncate_dim=48,
                         normalize_embeddings=True)
        assert same_bits(got, alone[order]).all()


@settings(max_examples=60, deadline=None)
@given(rows=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 40)),
                       elements=st.floats(-1e3, 1e3, width=32)),
       data=st.data())
def test_finish_rows_acts_on_each_row_alone(rows, data) -> None:
    k = data.draw(st.integers(1, rows.shape[1]))
    normalize = data.draw(st.booleans())
    whole = finish_rows(rows, k, normalize)
    assert whole.shape == (rows.shape[0], k)
    for i in range(rows.shape[0]):
        assert same_bits(finish_rows(rows[i:i + 1], k, normalize)[0], whole[i]).all()
        assert same_bits(finish_rows(rows[i], k, normalize), whole[i]).all()  # one row, as encode(str) has


def test_encoder_settings_and_per_call_overrides(minilm_artifact, texts) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, truncate_dim=32, normalize_embeddings=True)
    full = Encoder(minilm_artifact, check_hashes=False).encode(texts[:6])
    assert enc.dim == 32 and enc.manifest.dim == 384
    assert same_bits(enc.encode(texts[:6]), normalize_reference(full[:, :32])).all()
    assert enc.encode(texts[0]).shape == (32,)
    assert enc.encode([]).shape == (0, 32)
    assert same_bits(enc.encode(texts[:6], truncate_dim=384, normalize_embeddings=False), full).all()
    assert same_bits(enc.encode(texts[:6], normalize_embeddings=False), full[:, :32]).all()
    streamed = np.concatenate(list(enc.encode_stream(iter(texts[:6]), chunk_size=4)))
    assert same_bits(streamed, normalize_reference(full[:, :32])).all()
    streamed = np.concatenate(list(enc.encode_stream(texts[:6], chunk_size=4, truncate_dim=8,
                                                     normalize_embeddings=False)))
    assert same_bits(streamed, full[:, :8]).all()


@pytest.mark.parametrize("bad", [0, -1, 385, True, 2.5, "8"])
def test_a_bad_width_is_refused_before_anything_runs(minilm_artifact, enc, bad, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"truncate_dim must be an int from 1 to 384 .*got"):
        Encoder(minilm_artifact, check_hashes=False, truncate_dim=bad)
    calls = []
    monkeypatch.setattr(enc.backend, "run", lambda feeds: calls.append(feeds))
    with pytest.raises(ValueError, match=r"truncate_dim must be an int from 1 to 384"):
        enc.encode(["never run"], truncate_dim=bad)
    with pytest.raises(ValueError, match=r"truncate_dim must be an int from 1 to 384"):
        enc.encode_stream(["never run"], truncate_dim=bad)
    assert calls == []


def test_the_cache_keeps_full_rows_and_answers_any_width(minilm_artifact, texts) -> None:
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=64)
    full = enc.encode(texts[:10])
    cut = enc.encode(texts[:10], truncate_dim=16, normalize_embeddings=True)
    assert enc.cache.info().hits == 10
    assert same_bits(cut, normalize_reference(full[:, :16])).all()


def test_cli_embed_truncates_and_normalizes(minilm_artifact, enc, texts, tmp_path, capsys) -> None:
    want = enc.encode(texts[:3], truncate_dim=24, normalize_embeddings=True)
    assert main(["embed", str(minilm_artifact), *texts[:3], "--truncate-dim", "24", "--normalize"]) == 0
    rows = np.array([json.loads(line) for line in capsys.readouterr().out.splitlines()], dtype=np.float32)
    assert same_bits(rows, want).all()
    src = tmp_path / "in.txt"
    src.write_text("\n".join(t.replace("\n", " ") for t in texts[:3]), encoding="utf-8")
    out = tmp_path / "out.npy"
    assert main(["embed", str(minilm_artifact), "-i", str(src), "-o", str(out), "--truncate-dim", "24",
                 "--normalize"]) == 0
    assert same_bits(np.load(out), want).all()


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_resume_refuses_another_width_or_normalization(minilm_artifact, enc, texts, tmp_path, suffix) -> None:
    lines = [t.replace("\n", " ") for t in texts[:20]]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / f"out{suffix}"
    cut = Encoder(minilm_artifact, check_hashes=False, truncate_dim=16)
    real, calls = cut._encode_chunk, {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    cut._encode_chunk = dying
    with pytest.raises(KeyboardInterrupt):
        embed_file(cut, str(src), str(out), chunk_size=8)
    cut._encode_chunk = real
    before = out.read_bytes()
    with pytest.raises(ValueError, match="(rows hold 16 values, this encoder's embeddings 384|"
                                         r"shape \(20, 16\), this run writes float32 \(20, 384\))"):
        embed_file(enc, str(src), str(out), resume=True, chunk_size=8)
    unit = Encoder(minilm_artifact, check_hashes=False, truncate_dim=16, normalize_embeddings=True)
    with pytest.raises(ValueError, match="another truncate_dim / normalize_embeddings setting"):
        embed_file(unit, str(src), str(out), resume=True, chunk_size=8)
    assert out.read_bytes() == before
    assert embed_file(cut, str(src), str(out), resume=True, chunk_size=8) == 12
    got = np.load(out) if suffix == ".npy" else np.array(
        [json.loads(line)["embedding"] for line in out.read_text(encoding="utf-8").splitlines()], dtype=np.float32)
    assert same_bits(got, cut.encode(lines)).all()

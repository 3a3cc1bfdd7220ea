"""Encoder API: shapes, dtypes, order, errors that name the bad index, and no lost state after an error."""

from __future__ import annotations

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.runtime.verify import same_bits


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact)


def test_shapes(enc) -> None:
    assert enc.dim == 384 and enc.max_length == 256
    out = enc.encode(["hello world", "second"])
    assert out.shape == (2, 384) and out.dtype == np.float32
    single = enc.encode("hello world")
    assert single.shape == (384,) and same_bits(single, out[0]).all()
    empty = enc.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_iterables_and_generators(enc) -> None:
    texts = ["a b", "c d e", "f"]
    ref = enc.encode(texts)
    assert same_bits(enc.encode(t for t in texts), ref).all()
    assert same_bits(enc.encode(tuple(texts)), ref).all()


def test_edge_texts_are_finite(enc) -> None:
    edge = ["", "   ", "\x00", "\t\n\r", "🚀" * 300, "e\u0301" * 50, "שלום עולם", "x" * 100_000]
    out = enc.encode(edge)
    assert np.isfinite(out).all()
    # BERT's tokenizer drops whitespace: whitespace-only is the empty string
    assert same_bits(out[0], out[1]).all()


def test_truncation_to_max_length(enc) -> None:
    words = " ".join(f"word{i}" for i in range(2000))
    longer = words + " and more words at the very end"
    assert same_bits(enc.encode(words), enc.encode(longer)).all()
    assert len(enc.tokenizer.encode([words])[0].ids) == 256


@pytest.mark.parametrize("bad, kind, index", [
    (["ok", None], TypeError, 1), ([3, "ok"], TypeError, 0), (["ok", "ok", b"bytes"], TypeError, 2),
    (["ok", "bad \ud800 surrogate"], ValueError, 1),
])
def test_bad_input_names_index_and_encoder_keeps_working(enc, bad, kind, index) -> None:
    ref = enc.encode(["ok"])
    with pytest.raises(kind, match=f"index {index}"):
        enc.encode(bad)
    assert same_bits(enc.encode(["ok"]), ref).all()


def test_bad_arguments(minilm_artifact, enc) -> None:
    with pytest.raises(ValueError, match="mode"):
        Encoder(minilm_artifact, mode="static")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        Encoder(minilm_artifact, threads=0)


def test_missing_provider_is_an_error_not_a_fallback(minilm_artifact, monkeypatch) -> None:
    import onnxruntime as ort

    # an onnxruntime without CUDA, simulated: the check also runs where onnxruntime-gpu is installed
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        Encoder(minilm_artifact, provider="cuda")
    with pytest.raises(ValueError, match="unknown provider"):
        Encoder(minilm_artifact, provider="tpu")


def test_progress_bar(enc, capsys) -> None:
    enc.encode(["a", "b", "c"], show_progress=True)
    assert "3/3" in capsys.readouterr().err


class _Recorder:
    """Wraps a backend and records the feed shapes of every run."""

    def __init__(self, backend):
        self.inner, self.shapes = backend, []

    def run(self, feeds):
        self.shapes.append({k: v.shape for k, v in feeds.items()})
        return self.inner.run(feeds)


@pytest.mark.parametrize("budget, batch_size, expected", [(2048, 32, (8, 256)), (4096, 32, (16, 256)),
                                                          (2048, 4, (4, 256)), (255, 32, None)])
def test_warm_up_runs_the_largest_dynamic_batch_once(minilm_artifact, budget, batch_size, expected) -> None:
    """The largest run `encode` can schedule: max_length long, as many rows as the budget and batch_size
    allow; nothing when one max_length row is over the budget. Results afterwards are unchanged."""
    enc = Encoder(minilm_artifact, max_batch_tokens=budget)
    before = enc.encode(["warm", "up " * 300])
    enc.backend = rec = _Recorder(enc.backend)
    batch = enc.warm_up(batch_size)
    if expected is None:
        assert batch is None and rec.shapes == []
    else:
        assert (batch.rows, batch.length) == expected
        assert rec.shapes == [{name: expected for name in ("input_ids", "attention_mask", "token_type_ids")}]
    assert same_bits(enc.encode(["warm", "up " * 300]), before).all()


def test_warm_up_in_fixed_mode_takes_the_biggest_bucket(minilm_artifact) -> None:
    enc = Encoder(minilm_artifact, mode="fixed")
    enc.backend = rec = _Recorder(enc.backend)
    batch = enc.warm_up()
    rows, length = max(enc.manifest.fixed_buckets, key=lambda b: b[0] * b[1] * b[1])
    assert (batch.rows, batch.length) == (rows, length) and rec.shapes[0]["input_ids"] == (rows, length)


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_identical_texts_run_once_and_share_their_bits(minilm_artifact, real_texts, mode) -> None:
    """Repeated texts in one call run once (rows counted at the batches the backend gets, filler rows
    of fixed mode left out); every copy gets the bits of the text encoded alone."""
    enc = Encoder(minilm_artifact, mode=mode, check_hashes=False)
    distinct = list(dict.fromkeys(t for t in real_texts if t))[:5]
    picks = [0, 1, 0, 2, 3, 0, 4, 1, 2, 2]
    texts = [distinct[i] for i in picks] + ["", ""]
    alone = np.stack([enc.encode(t) for t in texts])
    rows_run: list[int] = []
    inner = enc._run_batch

    def counting(encodings, batch, prompt_lengths):
        rows_run.append(len(batch.indices))
        return inner(encodings, batch, prompt_lengths)

    enc._run_batch = counting  # type: ignore[method-assign]
    got = enc.encode(texts, batch_size=4)
    assert sum(rows_run) == len(distinct) + 1, rows_run  # five texts and the empty one
    assert same_bits(got, alone).all()
    # the progress bar still counts every text, copies included
    assert enc.encode(texts, show_progress=True).shape == (len(texts), enc.dim)

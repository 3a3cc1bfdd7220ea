"""Pooling and normalization kernels: exact equality with the NumPy reference, batch/padding invariance,
and agreement in meaning (tolerance) with sentence-transformers' torch formulas."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stableembed.kernels.normalize import normalize_reference, onnx_normalize
from stableembed.kernels.onnx_graph import Subgraph, standalone_model
from stableembed.kernels.pooling import MODES, check_modes, onnx_pool, pool_reference

MAX_LEN, H = 48, 12
MODE_SETS = [[m] for m in MODES] + [["mean", "cls"], ["max", "mean_sqrt_len", "lasttoken"]]


def _session(modes, normalize: bool, threads: int) -> ort.InferenceSession:
    sub = Subgraph("p")
    out = onnx_pool(sub, "hidden", "mask", modes, MAX_LEN)
    if normalize:
        out = onnx_normalize(sub, out, H * len(modes))
    model = standalone_model(sub, [("hidden", 1, ["b", "t", H]), ("mask", 7, ["b", "t"])], out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


SESSIONS = {(tuple(m), n, th): _session(m, n, th) for m in MODE_SETS for n in (False, True) for th in (1, 2)}


def _reference(hidden, mask, modes, normalize):
    out = pool_reference(hidden, mask, modes, max_length=MAX_LEN)
    return normalize_reference(out) if normalize else out


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _batch(rng, lengths, pad_to):
    hidden = rng.standard_normal((len(lengths), pad_to, H)).astype(np.float32)
    mask = np.zeros((len(lengths), pad_to), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return hidden, mask


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, MAX_LEN), min_size=1, max_size=6), extra=st.integers(0, 16),
       modes=st.sampled_from(MODE_SETS), normalize=st.booleans(), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31))
def test_row_bits_depend_on_row_alone(lengths, extra, modes, normalize, threads, seed) -> None:
    rng = np.random.default_rng(seed)
    pad_to = min(max(lengths) + extra, MAX_LEN)
    hidden, mask = _batch(rng, lengths, pad_to)
    sess = SESSIONS[(tuple(modes), normalize, threads)]
    batch = sess.run(None, {"hidden": hidden, "mask": mask})[0]
    ref = _reference(hidden, mask, modes, normalize)
    assert (_bits(batch) == _bits(ref)).all()
    for i, n in enumerate(lengths):
        # alone, unpadded, and at another position in a reversed batch
        alone = sess.run(None, {"hidden": hidden[i:i + 1, :n], "mask": mask[i:i + 1, :n]})[0]
        assert (_bits(alone[0]) == _bits(ref[i])).all()
    rev = sess.run(None, {"hidden": hidden[::-1].copy(), "mask": mask[::-1].copy()})[0]
    assert (_bits(rev[::-1]) == _bits(ref)).all()


def _torch_formula(hidden, mask, mode):
    """sentence-transformers' pooling formulas in float64, for meaning (not bits)."""
    h, m = hidden.astype(np.float64), mask.astype(np.float64)[:, :, None]
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return np.where(m > 0, h, -1e9).max(1)
    if mode == "mean":
        return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if mode == "mean_sqrt_len":
        return (h * m).sum(1) / np.sqrt(np.maximum(m.sum(1), 1e-9))
    if mode == "weightedmean":
        w = np.arange(1, h.shape[1] + 1)[None, :, None] * m
        return (h * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    last = mask.sum(1).astype(int) - 1
    return h[np.arange(len(h)), last]


@pytest.mark.parametrize("mode", MODES)
def test_reference_means_what_sentence_transformers_means(mode) -> None:
    rng = np.random.default_rng(3)
    hidden, mask = _batch(rng, [1, 5, 17, 48], MAX_LEN)
    np.testing.assert_allclose(pool_reference(hidden, mask, [mode]), _torch_formula(hidden, mask, mode),
                               rtol=1e-5, atol=1e-5)


def test_normalize_is_unit_and_zero_safe() -> None:
    x = np.random.default_rng(5).standard_normal((4, 384)).astype(np.float32)
    x[3] = 0
    y = normalize_reference(x)
    np.testing.assert_allclose(np.linalg.norm(y[:3].astype(np.float64), axis=1), 1.0, rtol=1e-6)
    assert (y[3] == 0).all()


def test_modes_are_checked_and_ordered() -> None:
    assert check_modes(["mean", "cls"]) == ["mean", "cls"]  # the config's order, as sentence-transformers
    with pytest.raises(ValueError, match="unknown pooling mode"):
        check_modes(["median"])


# -- a separate pooling mask (include_prompt=False: a prompt's leading tokens are not pooled) ----------

def _prompt_session(modes, threads: int) -> ort.InferenceSession:
    sub = Subgraph("p")
    out = onnx_pool(sub, "hidden", "mask", modes, MAX_LEN, pool_mask="pool")
    model = standalone_model(sub, [("hidden", 1, ["b", "t", H]), ("mask", 7, ["b", "t"]),
                                   ("pool", 7, ["b", "t"])], out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


PROMPT_SESSIONS = {(tuple(m), th): _prompt_session(m, th) for m in MODE_SETS for th in (1, 2)}


def _pool_mask(mask, prompt_lengths):
    pool = mask.copy()
    for i, p in enumerate(prompt_lengths):
        pool[i, :p] = 0
    return pool


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, MAX_LEN), st.integers(0, MAX_LEN + 2)), min_size=1, max_size=6),
       extra=st.integers(0, 16), modes=st.sampled_from(MODE_SETS), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31))
def test_prompt_excluded_row_bits_depend_on_row_alone(rows, extra, modes, threads, seed) -> None:
    """Rows of different lengths and prompt lengths (some covering the whole row) in one padded batch:
    the ONNX form equals the reference bit for bit, alone, unpadded and at another position."""
    rng = np.random.default_rng(seed)
    lengths, prompts = [n for n, _ in rows], [p for _, p in rows]
    pad_to = min(max(lengths) + extra, MAX_LEN)
    hidden, mask = _batch(rng, lengths, pad_to)
    pool = _pool_mask(mask, prompts)
    sess = PROMPT_SESSIONS[(tuple(modes), threads)]
    batch = sess.run(None, {"hidden": hidden, "mask": mask, "pool": pool})[0]
    ref = pool_reference(hidden, mask, modes, pool_mask=pool, max_length=MAX_LEN)
    assert (_bits(batch) == _bits(ref)).all()
    for i, n in enumerate(lengths):
        alone = sess.run(None, {"hidden": hidden[i:i + 1, :n], "mask": mask[i:i + 1, :n], "pool": pool[i:i + 1, :n]})[0]
        assert (_bits(alone[0]) == _bits(ref[i])).all()
    rev = sess.run(None, {"hidden": hidden[::-1].copy(), "mask": mask[::-1].copy(), "pool": pool[::-1].copy()})[0]
    assert (_bits(rev[::-1]) == _bits(ref)).all()
    # no prompt: the pooling mask equals the attention mask and the result is the plain pooling's
    plain = pool_reference(hidden, mask, modes, max_length=MAX_LEN)
    assert (_bits(pool_reference(hidden, mask, modes, pool_mask=mask, max_length=MAX_LEN)) == _bits(plain)).all()


@pytest.mark.parametrize("mode", MODES)
def test_prompt_exclusion_means_what_sentence_transformers_means(mode) -> None:
    """Against sentence-transformers' own Pooling(include_prompt=False) module (torch), every mode."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling

    st_mode = {"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(mode, mode)
    module = Pooling(H, pooling_mode=st_mode, include_prompt=False)
    rng = np.random.default_rng(4)
    lengths = [9, 5, 17, 48]
    hidden, mask = _batch(rng, lengths, MAX_LEN)
    # one prompt length per batch, as sentence-transformers passes it; 5 covers the whole second row
    # (max pooling is left out there: sentence-transformers fills with -inf, we with -1e9)
    changed = []
    for prompt_length in (1, 3, 5):
        keep = [i for i, n in enumerate(lengths) if n > prompt_length or mode != "max"]
        h, m = hidden[keep], mask[keep]
        features = {"token_embeddings": torch.from_numpy(h), "attention_mask": torch.from_numpy(m),
                    "prompt_length": prompt_length}
        expected = module(features)["sentence_embedding"].numpy()
        got = pool_reference(h, m, [mode], pool_mask=_pool_mask(m, [prompt_length] * len(keep)))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        changed.append(bool((got != pool_reference(h, m, [mode])).any()))
    assert any(changed)  # the prompt's exclusion did change something (lasttoken: only the covered row)


def test_a_negative_zero_component_pools_alike_alone_or_padded() -> None:
    """A component that is -0.0 in every token (and a row whose pooled tokens are all cleared) sums to the
    same signed zero in the ONNX form and the reference given its max_length, alone or padded."""
    hidden, mask = _batch(np.random.default_rng(3), [5, 2], 9)
    hidden[:, :, 4] = np.float32(-0.0)
    for modes in (["mean"], ["mean_sqrt_len"], ["weightedmean"]):
        ref = pool_reference(hidden, mask, modes, max_length=MAX_LEN)
        sess = SESSIONS[(tuple(modes), False, 1)]
        assert (_bits(sess.run(None, {"hidden": hidden, "mask": mask})[0]) == _bits(ref)).all()
        alone = sess.run(None, {"hidden": hidden[1:, :2], "mask": mask[1:, :2]})[0]
        assert (_bits(alone[0]) == _bits(ref[1])).all()
        pool = _pool_mask(mask, [5, 2])  # nothing left to pool
        got = PROMPT_SESSIONS[(tuple(modes), 1)].run(None, {"hidden": hidden, "mask": mask, "pool": pool})[0]
        assert (_bits(got) == _bits(pool_reference(hidden, mask, modes, pool_mask=pool, max_length=MAX_LEN))).all()


def test_weightedmean_beyond_float32s_exact_integers() -> None:
    """Position weights of a 5,814-token text sum past 2^24; summed in float32 the total would round
    depending on the padded length (and so on the batch). It is summed in int64."""
    long_max = 8192
    sub = Subgraph("p")
    model = standalone_model(sub, [("hidden", 1, ["b", "t", 2]), ("mask", 7, ["b", "t"])],
                             onnx_pool(sub, "hidden", "mask", ["weightedmean"], long_max))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = 5814
    assert n * (n + 1) // 2 > 2 ** 24
    hidden = np.random.default_rng(0).standard_normal((1, long_max, 2)).astype(np.float32)
    mask = np.zeros((1, long_max), np.int64)
    mask[0, :n] = 1
    ref = pool_reference(hidden[:, :n], mask[:, :n], ["weightedmean"], max_length=long_max)
    for pad_to in (n, n + 5, long_max):
        got = sess.run(None, {"hidden": hidden[:, :pad_to], "mask": mask[:, :pad_to]})[0]
        assert (_bits(got) == _bits(ref)).all(), pad_to
        again = pool_reference(hidden[:, :pad_to], mask[:, :pad_to], ["weightedmean"], max_length=long_max)
        assert (_bits(again) == _bits(ref)).all(), pad_to

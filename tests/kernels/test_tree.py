"""The pairwise tree: ONNX form == NumPy reference bit for bit; padding changes nothing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail
from hypothesis import given, settings
from hypothesis import strategies as st

from stableembed.kernels.onnx_graph import Subgraph, standalone_model
from stableembed.kernels.tree import levels_for, onnx_tree_reduce, tree_reduce

MAX_LEN = 64


def _session(op: str, threads: int = 1) -> ort.InferenceSession:
    sub = Subgraph("t")
    out = onnx_tree_reduce(sub, "x", MAX_LEN, op)
    model = standalone_model(sub, [("x", 1, ["b", "l", "c"])], out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


SESSIONS = {(op, th): _session(op, th) for op in ("add", "max") for th in (1, 2)}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_tree_order_is_adjacent_pairs() -> None:
    # 1e8 + 1 - 1e8 ... : the grouping decides the float32 result, so this pins the order.
    x = np.array([1e8, 1.0, -1e8, 1.0, 3.0], dtype=np.float32)
    expected = np.float32((np.float32(1e8) + np.float32(1.0)) + (np.float32(-1e8) + np.float32(1.0))) + np.float32(3.0)
    assert _bits(tree_reduce(x, 0)) == _bits(expected)


def test_levels_for() -> None:
    assert [levels_for(n) for n in (1, 2, 3, 4, 5, 256, 257)] == [1, 1, 2, 2, 3, 8, 9]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 5), length=st.integers(1, MAX_LEN), c=st.integers(1, 9), extra=st.integers(0, 20),
       op=st.sampled_from(["add", "max"]), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_onnx_matches_reference_and_ignores_padding(b, length, c, extra, op, threads, seed) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, length, c)) * rng.choice([1e-3, 1.0, 1e4])).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.float32(-0.0)
    x[:, :, 0] = np.float32(-0.0)  # a sum of -0.0s: its sign depends on the depth
    ident = np.float32(0.0 if op == "add" else -np.inf)
    padded = np.concatenate([x, np.full((b, min(extra, MAX_LEN - length), c), ident, np.float32)], axis=1)
    ref = tree_reduce(x, 1, op, levels=levels_for(MAX_LEN))
    sess = SESSIONS[(op, threads)]
    assert (_bits(sess.run(None, {"x": x})[0]) == _bits(ref)).all()
    assert (_bits(sess.run(None, {"x": padded})[0]) == _bits(ref)).all()
    assert (_bits(tree_reduce(padded, 1, op, levels=levels_for(MAX_LEN))) == _bits(ref)).all()
    # each row alone == row in the batch
    for i in range(b):
        assert (_bits(sess.run(None, {"x": x[i:i + 1]})[0][0]) == _bits(ref[i])).all()


def test_sum_is_accurate() -> None:
    x = np.random.default_rng(0).standard_normal((3, 300, 8)).astype(np.float32)
    np.testing.assert_allclose(tree_reduce(x, 1), x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


def test_longer_than_max_length_fails_loudly() -> None:
    """The tree has levels for MAX_LEN elements: exactly MAX_LEN reduces, one more leaves two partial sums on
    the axis and the final Squeeze refuses them (an error, never a silently partial sum)."""
    sess = SESSIONS[("add", 1)]
    assert (sess.run(None, {"x": np.ones((1, MAX_LEN, 2), np.float32)})[0] == MAX_LEN).all()
    with pytest.raises(Fail, match="Squeeze.*must be 1 instead of 2"):
        sess.run(None, {"x": np.ones((1, MAX_LEN + 1, 2), np.float32)})


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), length=st.integers(1, 400), c=st.integers(1, 3), op=st.sampled_from(["add", "max"]),
       seed=st.integers(0, 2**31))
def test_static_length_form_matches_reference(b, length, c, op, seed) -> None:
    """The embedding-width form (Pad only on odd levels) gives the reference's bits for every width."""
    sub = Subgraph("t")
    out = onnx_tree_reduce(sub, "x", length, op, static_length=True)
    model = standalone_model(sub, [("x", 1, ["b", length, "c"])], out)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((b, length, c)).astype(np.float32)
    x[:, ::7] *= np.float32(1e6)  # mixed magnitudes: another pairing would round differently
    assert (_bits(sess.run(None, {"x": x})[0]) == _bits(tree_reduce(x, 1, op))).all()
    pads = sum(n.op_type == "Pad" for n in model.graph.node)
    assert pads == sum(1 for k in range(levels_for(length)) if -(-length // 2 ** k) % 2 == 1)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 33, MAX_LEN])
def test_a_negative_zero_sum_follows_the_depth(length) -> None:
    """The ONNX form runs the levels of MAX_LEN whatever the axis; each level past one element adds the
    +0.0 identity, which turns a -0.0 sum into +0.0. The reference given those levels does the same;
    only an axis that needs all of them (64 = MAX_LEN) keeps -0.0."""
    x = np.zeros((1, length, 3), np.float32)
    x[:, :, 0] = np.float32(-0.0)
    x[:, :, 1] = np.float32(2.5)
    ref = tree_reduce(x, 1, levels=levels_for(MAX_LEN))
    assert _bits(ref)[0, 0] == (0x80000000 if length == MAX_LEN else 0)
    if length & (length - 1) == 0:  # no identity padding within the tree itself: the sign stays there
        assert _bits(tree_reduce(x, 1))[0, 0] == 0x80000000
    for threads in (1, 2):
        got = SESSIONS[("add", threads)].run(None, {"x": x})[0]
        assert (_bits(got) == _bits(ref)).all()


def test_levels_must_cover_the_axis() -> None:
    with pytest.raises(ValueError, match="need more than 2 levels"):
        tree_reduce(np.ones((5, 1), np.float32), 0, levels=2)

"""int8 linear kernels: ONNX form == NumPy reference bit for bit, for every activation form and kernel;
each row's bits independent of the row count, its companions and the thread count; no int16 saturation."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from stableembed.kernels import quant as Q
from stableembed.kernels.onnx_graph import Subgraph


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _session(k: int, wq: np.ndarray, c: np.ndarray, spec: Q.ActSpec, kernel: str, threads: int,
             opset: int = 17, form: str = "axis") -> ort.InferenceSession:
    sub = Subgraph("q")
    u, s = Q.onnx_quantize_rows(sub, "x", opset, spec, form)
    y = Q.onnx_qmatmul(sub, u, s, wq, c, spec, kernel)
    graph = helper.make_graph(sub.nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=sub.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(Q.MS_DOMAIN, 1)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _spec(kind: str, k: int, rng: np.random.Generator) -> Q.ActSpec:
    smooth = rng.uniform(0.05, 4.0, k).astype(np.float32)
    return {"symmetric": Q.SYMMETRIC, "smooth": Q.ActSpec(smooth=smooth), "offset": Q.ActSpec(offset=0.17),
            "smooth+offset": Q.ActSpec(smooth=smooth, offset=0.5)}[kind]


def _activations(rng: np.random.Generator, b: int, t: int, k: int, spec: Q.ActSpec) -> np.ndarray:
    x = (rng.standard_normal((b, t, k)) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    if spec.offset is not None:
        x = np.maximum(x, np.float32(-spec.offset))  # one-sided, like GELU outputs (a few below: clipped)
        x[:, :, 0] = -2 * spec.offset
    x[0, 0] = 0.0  # a row of zeros
    x[:, -1, : min(3, k)] = 0.0
    if t > 1:  # exact rounding ties: x / s lands on .5
        _, s = Q.quantize_rows(x[:, 1:2], spec)
        x[:, 1, 0] = np.float32(2.5) * s[:, 0, 0] / (spec.smooth[0] if spec.smooth is not None else 1)
    return x


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 24), k=st.integers(1, 80), n=st.integers(1, 40),
       kind=st.sampled_from(["symmetric", "smooth", "offset", "smooth+offset"]),
       kernel=st.sampled_from(["u8s8", "u8u8"]), threads=st.sampled_from([1, 2]),
       opset=st.sampled_from([17, 18]), form=st.sampled_from(["axis", "div"]), seed=st.integers(0, 2**31))
def test_onnx_matches_reference_row_by_row(b, t, k, n, kind, kernel, threads, opset, form, seed) -> None:
    rng = np.random.default_rng(seed)
    spec = _spec(kind, k, rng)
    wq, c, _ = Q.prepare_weight(rng.standard_normal((k, n)).astype(np.float32), spec, kernel)
    x = _activations(rng, b, t, k, spec)
    sess = _session(k, wq, c, spec, kernel, threads, opset, form)
    ref = Q.qlinear_reference(x, wq, c, spec)
    assert (_bits(sess.run(None, {"x": x})[0]) == _bits(ref)).all()
    for i in range(b):  # each row alone, and each sequence alone: same bits
        assert (_bits(sess.run(None, {"x": x[i:i + 1]})[0]) == _bits(ref[i:i + 1])).all()
        j = int(rng.integers(t))
        assert (_bits(sess.run(None, {"x": x[i:i + 1, j:j + 1]})[0]) == _bits(ref[i:i + 1, j:j + 1])).all()


@pytest.mark.parametrize("k,n", [(384, 1536), (1536, 384), (7, 5)])
@pytest.mark.parametrize("kernel", ["u8s8", "u8u8"])
def test_real_shapes_every_row_count_and_threads(k, n, kernel) -> None:
    """M from 1 to 600 rows (what the GEMM sees as batch x length), 1 and 2 threads: the same bits."""
    rng = np.random.default_rng(k + n)
    wq, c, _ = Q.prepare_weight(rng.standard_normal((k, n)).astype(np.float32), Q.SYMMETRIC, kernel)
    x = _activations(rng, 20, 30, k, Q.SYMMETRIC)
    ref = Q.qlinear_reference(x, wq, c)
    for threads in (1, 2):
        sess = _session(k, wq, c, Q.SYMMETRIC, kernel, threads)
        for rows in ((20, 30), (1, 1), (1, 30), (3, 7), (16, 17), (20, 29)):
            got = sess.run(None, {"x": np.ascontiguousarray(x[: rows[0], : rows[1]])})[0]
            assert (_bits(got) == _bits(ref[: rows[0], : rows[1]])).all(), (threads, rows)


@pytest.mark.parametrize("kernel", ["u8s8", "u8u8"])
def test_extreme_values_never_saturate(kernel) -> None:
    """Activations at the ends of the uint8 range against weight pairs at the int16 limit: still exact.

    onnxruntime's AVX2 uint8 x int8 kernel adds pairs of products into saturating int16
    (vpmaddubsw); the pair limit keeps |u1 w1 + u2 w2| <= 255 * 128 < 32767.
    """
    k, n = 64, 16
    w = np.zeros((k, n), np.float32)
    w[0::2], w[1::2] = 1.0, 1.0  # every pair at the limit: 64 + 64
    w[:, 1::2] *= -1
    wq, c, _ = Q.prepare_weight(w, Q.SYMMETRIC, kernel)
    if kernel == "u8s8":
        assert (np.abs(wq[0::2].astype(int)) + np.abs(wq[1::2].astype(int))).max() == Q.PAIR_LIMIT
    x = np.ones((2, 3, k), np.float32)
    x[1] = -1.0  # u = 255 and u = 1
    x[0, 1, 1::2] = -1.0
    sess = _session(k, wq, c, Q.SYMMETRIC, kernel, 1)
    assert (_bits(sess.run(None, {"x": x})[0]) == _bits(Q.qlinear_reference(x, wq, c))).all()


def test_quantize_weight_pairs_and_scales() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((385, 50)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    q, c = Q.quantize_weight(w)
    pairs = np.abs(np.concatenate([q.astype(int), np.zeros((1, 50), int)])).reshape(-1, 2, 50).sum(axis=1)
    assert pairs.max() <= Q.PAIR_LIMIT and np.abs(q.astype(int)).max() <= Q.QW
    assert c[3] == 1.0 and not q[:, 3].any()
    # dequantized weights are close: each entry within half a step, except the rare pairs lowered by one
    err = np.abs(q * c - w) / c
    assert np.mean(err <= 0.5 + 1e-6) > 0.999 and err.max() <= 1.5 + 1e-6
    q8, c8 = Q.quantize_weight(w, pair_limit=None)
    assert np.abs(q8.astype(int)).max() == Q.QW and (c8 <= c).all()


def test_quantize_rows_reference() -> None:
    x = np.array([[[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 1e-3, 2.999]]], np.float32)
    u, s = Q.quantize_rows(x)
    assert u.dtype == np.uint8 and s.shape == (1, 3, 1)
    assert u[0, 0].tolist() == [255, 128 - 64, 128 + 32, 128]  # 127 * [1, -.5, .25, 0]; -63.5 -> -64 (even)
    assert u[0, 1].tolist() == [128] * 4 and s[0, 1, 0] > 0
    assert u[0, 2, 0] == 1 and u[0, 2, 3] == 255
    one = Q.ActSpec(offset=0.25)
    u, s = Q.quantize_rows(np.array([[-0.25, 0.75, -1.0]], np.float32), one)
    assert u.tolist() == [[0, 255, 0]] and s[0, 0] == np.float32(1.0) / np.float32(255)


def test_offset_bias_correction_restores_the_product() -> None:
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((50, 96)).astype(np.float32), -0.17)
    w = rng.standard_normal((96, 24)).astype(np.float32)
    spec = Q.ActSpec(offset=0.17)
    wq, c, corr = Q.prepare_weight(w, spec)
    got = Q.qlinear_reference(x, wq, c, spec) + corr
    ref = x.astype(np.float64) @ w
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02


@settings(max_examples=20, deadline=None)
@given(v=st.integers(1, 300), h=st.integers(1, 40), shape=st.lists(st.integers(1, 6), min_size=1, max_size=2),
       seed=st.integers(0, 2**31))
def test_int8_table_gather(v, h, shape, seed) -> None:
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((v, h)).astype(np.float32)
    table[0] = 0.0
    eq, scale = Q.quantize_table(table)
    assert np.abs(eq.astype(int)).max() <= Q.QE
    ids = rng.integers(0, v, shape).astype(np.int64)
    sub = Subgraph("g")
    out = Q.onnx_gather(sub, "ids", eq, scale)
    graph = helper.make_graph(sub.nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=sub.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = Q.gather_reference(eq, scale, ids)
    assert (_bits(sess.run(None, {"ids": ids})[0]) == _bits(ref)).all()
    assert np.abs(ref - table[ids]).max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("spec", [Q.SYMMETRIC, Q.ActSpec(offset=0.0)], ids=["symmetric", "one-sided"])
def test_rounding_ties_go_to_even(spec) -> None:
    """A row whose scale is exactly 1.0 (max 127, or 255 one-sided): x / s hits .5 exactly."""
    top = 127.0 if spec.offset is None else 255.0
    ties = [2.5, 3.5, 0.5, 1.5, 126.5] + ([-3.5, -0.5, -2.5] if spec.offset is None else [4.5, 5.5, 6.5])
    x = np.array([[[top, *ties]]], np.float32)
    u, s = Q.quantize_rows(x, spec)
    assert s[0, 0, 0] == 1.0
    expect = np.rint(x[0, 0]) + (Q.ZERO_POINT if spec.offset is None else 0)
    assert u[0, 0].tolist() == expect.astype(int).tolist()
    k = x.shape[-1]
    wq = np.eye(k, dtype=np.int8)
    c = np.ones(k, np.float32)
    got = _session(k, wq, c, spec, "u8s8", 1).run(None, {"x": x})[0]
    assert (_bits(got) == _bits(Q.qlinear_reference(x, wq, c, spec))).all()
    assert got[0, 0].tolist() == np.rint(x[0, 0]).tolist()


def test_a_subnormal_weight_column_quantizes_to_zeros_without_nan() -> None:
    """max|w| / 127 underflows to 0 for a column of subnormals: the column gets scale 1 and zeros (as an
    all-zero column does), never 0/0 cast to int8."""
    w = np.ones((6, 3), np.float32)
    w[:, 1] = np.float32(1e-44)  # subnormal: / 127 rounds to 0
    w[:, 2] = 0.0
    with np.errstate(invalid="raise", divide="raise"):  # (the scale's underflow itself is expected)
        q, c = Q.quantize_weight(w)
    assert (q[:, 1:] == 0).all() and (c[1:] == 1.0).all() and np.isfinite(c).all()
    assert (q[:, 0] != 0).all()

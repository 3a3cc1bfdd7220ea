"""int8 linear layers whose bits depend on each row alone: NumPy references and ONNX forms.

The bits, for an activation x [..., K] times a constant weight W [K, N] (the bias is added afterwards by
the graph's own Add):

  weights (export time, per output channel n; `quantize_weight`):
      c[n]  = max(max_k |W[k, n]| / 127, max_j (|W[2j, n]| + |W[2j+1, n]|) / 128)
      Wq    = rint(W / c) as int8, |Wq| <= 127 and |Wq[2j, n]| + |Wq[2j+1, n]| <= 128
  activations (run time, per row, i.e. per token; `quantize_rows`), after an optional per-channel
  smoothing x <- x * m (m fixed at export; W's rows are divided by m):
      symmetric:  a = max_k |x[k]|,      s = max(a, TINY) / 127, u = clip(rint(x / s), -127, 127) + 128
      one-sided:  x <- x + o, a = max_k x[k], s = max(a, TINY) / 255, u = clip(rint(x / s), 0, 255)
                  (o fixed at export, for activations bounded below such as GELU outputs; the bias
                  absorbs -o * sum_k W[k, n])
  product (`qlinear_reference`):
      acc[n] = sum_k (u[k] - zero_point) * Wq[k, n]     (int32: exact integers, any order, same value)
      y[n]   = (float32(acc[n]) * c[n]) * s             (two float32 roundings, in this order)

Every step is elementwise (one correctly rounded IEEE operation), a max (exact in any order), or an
integer sum (exact, as long as nothing overflows or saturates), so a row's result cannot depend on the
other rows, the padding, the row count M that the GEMM sees, or the thread count.

Why the pair limit: on AVX2 CPUs without VNNI (this project's CI machines), onnxruntime's uint8 x int8
QGEMM (MLAS) multiplies with `vpmaddubsw`, which adds two adjacent u8*s8 products (rows 2j, 2j+1 of
the weight) into a *saturating* int16. With u <= 255 and |w1| + |w2| <= 128 the pair is at most
255 * 128 = 32640 < 32767: it never saturates, so the sum is exact on that kernel as on the VNNI, AMX
and ARM ones, which accumulate in int32. Plain 8-bit weights (|w| <= 127 each) do saturate (measured:
the result then differs from the exact sum). On MiniLM's weights the limit costs about half a bit.
The "u8u8" kernel (weights stored as uint8 Wq + 128) needs no limit but runs slower here.

Embedding tables (Gather of a constant [V, H]) are stored per row (per token id):
      e[v] = max_h |E[v, h]| / 127,  Eq = rint(E / e) as int8,  row = float32(Eq[id]) * e[id]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QA = 127  # activation levels each side of zero
QW = 127  # weight levels each side of zero
PAIR_LIMIT = 128  # |w[2j]| + |w[2j+1]| <= 128: no int16 saturation (see the module docstring)
QE = 127  # embedding-table levels each side of zero
ZERO_POINT = 128  # activations are stored as uint8 = q + 128
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators
TINY = np.float32(1e-30)  # a row of zeros gets scale TINY / QA instead of 0 (no division by zero)


def quantize_weight(w: np.ndarray, qmax: int = QW, pair_limit: int | None = PAIR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (column) symmetric int8: W [K, N] float32 -> (Wq int8 [K, N], c float32 [N]).

    c[n] = max(max_k |W[k, n]| / qmax, max_j (|W[2j, n]| + |W[2j+1, n]|) / pair_limit), so every pair
    of rows (2j, 2j+1) satisfies |Wq[2j, n]| + |Wq[2j+1, n]| <= pair_limit (rounding both up can
    overshoot by one: then the larger magnitude is lowered by one).
    """
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    c = amax / np.float32(qmax)
    if pair_limit is not None:
        c = np.maximum(c, np.abs(_pairs(w)).sum(axis=1).max(axis=0) / np.float32(pair_limit))
    # a zero column, or one so tiny (subnormal) that its scale underflows to 0: scale 1, all weights 0
    c = np.where(c > 0, c, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / c), -qmax, qmax).astype(np.int8)
    if pair_limit is not None:
        q = _fix_pairs(q, pair_limit)
    return q, c


def _pairs(a: np.ndarray) -> np.ndarray:
    """[K, N] -> [ceil(K/2), 2, N], the last row paired with a zero when K is odd."""
    if a.shape[0] % 2:
        a = np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)])
    return a.reshape(a.shape[0] // 2, 2, a.shape[1])


def _fix_pairs(q: np.ndarray, limit: int) -> np.ndarray:
    k = q.shape[0]
    p = _pairs(q.astype(np.int32))
    mag = np.abs(p)
    over = mag.sum(axis=1) > limit  # [pairs, N]
    if over.any():
        big = mag.argmax(axis=1)  # the first of the two when equal
        j, n = np.nonzero(over)
        p[j, big[j, n], n] -= np.sign(p[j, big[j, n], n])
    assert (np.abs(p).sum(axis=1) <= limit).all()
    return p.reshape(-1, q.shape[1])[:k].astype(np.int8)


def quantize_table(e: np.ndarray, qmax: int = QE) -> tuple[np.ndarray, np.ndarray]:
    """Per row symmetric int8 of an embedding table E [V, H] -> (Eq int8 [V, H], scale float32 [V])."""
    q, c = quantize_weight(np.asarray(e, dtype=np.float32).T, qmax, pair_limit=None)
    return np.ascontiguousarray(q.T), c


@dataclass(frozen=True)
class ActSpec:
    """How one activation is quantized per row (constants fixed at export).

    smooth: float32 [K] or None: x is first multiplied by it, channel by channel (SmoothQuant: the
        weights' rows are divided by the same factors), so that outlier channels stop setting the row's
        scale alone.
    offset: float32 or None: one-sided activations (GELU outputs, bounded below): x + offset is
        quantized to 0..255 with zero point 0 and scale max(x + offset) / 255, twice the resolution of
        the symmetric form; the bias absorbs -offset * sum_k W[k, n].
    """

    smooth: np.ndarray | None = None
    offset: float | None = None

    @property
    def zero_point(self) -> int:
        return 0 if self.offset is not None else ZERO_POINT

    @property
    def levels(self) -> int:
        return 255 if self.offset is not None else QA


SYMMETRIC = ActSpec()


def quantize_rows(x: np.ndarray, spec: ActSpec = SYMMETRIC) -> tuple[np.ndarray, np.ndarray]:
    """Per row (last axis): x float32 [..., K] -> (u uint8 [..., K], s float32 [..., 1]).

    symmetric: a = max|x|, s = max(a, TINY) / 127, u = clip(rint(x / s), -127, 127) + 128.
    offset:    x <- x + offset, a = max x, s = max(a, TINY) / 255, u = clip(rint(x / s), 0, 255).
    Smoothing, when given, multiplies x first. Each step is one float32 operation (or an exact max).
    """
    x = np.asarray(x, dtype=np.float32)
    if spec.smooth is not None:
        x = x * spec.smooth.astype(np.float32)
    if spec.offset is None:
        a = np.abs(x).max(axis=-1, keepdims=True)
    else:
        x = x + np.float32(spec.offset)
        a = x.max(axis=-1, keepdims=True)
    s = (np.maximum(a, TINY) / np.float32(spec.levels)).astype(np.float32)
    lo, hi = (0, 255) if spec.offset is not None else (-QA, QA)
    q = np.clip(np.rint(x / s), lo, hi) + (spec.zero_point if spec.offset is None else 0)
    return q.astype(np.uint8), s


def int_matmul(u: np.ndarray, zero_point: int, wq: np.ndarray) -> np.ndarray:
    """Exact sum_k (u - zero_point) * Wq as int32.

    Computed as a float64 matmul: every product and partial sum is an integer below 2**53, so any
    summation order gives the exact value (and BLAS is fast).
    """
    acc = (u.astype(np.float64) - zero_point) @ wq.astype(np.float64)
    assert np.abs(acc).max(initial=0) < 2**31
    return acc.astype(np.int32)


def qlinear_reference(x: np.ndarray, wq: np.ndarray, c: np.ndarray, spec: ActSpec = SYMMETRIC) -> np.ndarray:
    """NumPy reference defining the bits of `onnx_qmatmul`: x float32 [..., K] -> float32 [..., N]."""
    u, s = quantize_rows(x, spec)
    acc = int_matmul(u, spec.zero_point, wq)
    return (acc.astype(np.float32) * c) * s


def prepare_weight(w: np.ndarray, spec: ActSpec = SYMMETRIC, kernel: str = "u8s8") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] for activations quantized by `spec` -> (Wq int8, c float32 [N], bias correction float32 [N]).

    Smoothing divides W's rows by the factors x is multiplied with; the offset's contribution,
    offset * sum_k Wq[k, n] * c[n], is returned negated, for the bias. kernel "u8s8" limits pairs of rows
    (no int16 saturation); "u8u8" needs no limit.
    """
    w = np.asarray(w, dtype=np.float64)
    if spec.smooth is not None:
        w = w / spec.smooth.astype(np.float32).astype(np.float64)[:, None]
    wq, c = quantize_weight(w.astype(np.float32), QW, PAIR_LIMIT if kernel == "u8s8" else None)
    corr = np.zeros(w.shape[1], np.float32)
    if spec.offset is not None:
        corr = (-np.float64(np.float32(spec.offset)) * (wq.astype(np.float64) * c).sum(axis=0)).astype(np.float32)
    return wq, c, corr


def gather_reference(eq: np.ndarray, scale: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """NumPy reference of `onnx_gather`: rows of the int8 table, dequantized."""
    return eq[ids].astype(np.float32) * scale[ids][..., None]


# ---- ONNX forms ----------------------------------------------------------------------------------------------

def _reduce(sub, op: str, t: str, opset: int, hint: str) -> str:
    if opset >= 18:
        return sub.op(op, [t, sub.const(np.array([-1], np.int64), "axes")], hint, keepdims=1)
    return sub.op(op, [t], hint, axes=[-1], keepdims=1)


def onnx_quantize_rows(sub, x: str, opset: int, spec: ActSpec = SYMMETRIC, form: str = "axis") -> tuple[str, str]:
    """x float32 [..., K] -> (u uint8 [..., K], s float32 [..., 1]); same bits as `quantize_rows`.

    form "axis": x is viewed as [M, K] and one per-axis QuantizeLinear (axis 0, scale s [M], zero point
    per row) computes clip(rint(x / s) + zero_point) in one pass (equal to the reference, ties included:
    tests). form "div": a broadcast Div x / s, then a per-tensor QuantizeLinear with scale 1.0 (exact)
    and the zero point: one more pass, but both ops run on all threads.
    """
    if spec.smooth is not None:
        x = sub.op("Mul", [x, sub.const(spec.smooth.astype(np.float32), "smooth")], "smoothed")
    if spec.offset is None:
        amax = _reduce(sub, "ReduceMax", sub.op("Abs", [x], "abs"), opset, "amax")
    else:
        x = sub.op("Add", [x, sub.const(np.float32(spec.offset), "offset")], "shifted")
        amax = _reduce(sub, "ReduceMax", x, opset, "amax")
    s = sub.op("Div", [sub.op("Max", [amax, sub.const(TINY, "tiny")], "amax_safe"),
                       sub.const(np.float32(spec.levels), "levels")], "act_scale")
    if form == "div":
        u = sub.op("QuantizeLinear", [sub.op("Div", [x, s], "scaled"), sub.const(np.float32(1.0), "one"),
                                      sub.const(np.uint8(spec.zero_point), "zp")], "act_q")
        return u, s
    shape = sub.op("Shape", [x], "x_shape")
    k = sub.op("Slice", [shape, sub.const(np.array([-1], np.int64), "s"),
                         sub.const(np.array([2**62], np.int64), "e")], "k")
    x2 = sub.op("Reshape", [x, sub.op("Concat", [sub.const(np.array([-1], np.int64), "m1"), k], "mk", axis=0)], "x2d")
    s1 = sub.op("Reshape", [s, sub.const(np.array([-1], np.int64), "m1")], "s1d")
    zp = sub.op("Expand", [sub.const(np.uint8(spec.zero_point), "zp"), sub.op("Shape", [s1], "m")], "zp_rows")
    u2 = sub.op("QuantizeLinear", [x2, s1, zp], "act_q2d", axis=0)
    return sub.op("Reshape", [u2, shape], "act_q"), s


def onnx_qmatmul(sub, u: str, s: str, wq: np.ndarray, c: np.ndarray, spec: ActSpec = SYMMETRIC,
                 kernel: str = "u8s8") -> str:
    """(u, s) from `onnx_quantize_rows` times the int8 weight -> float32 [..., N]; bits of `qlinear_reference`.

    com.microsoft MatMulIntegerToFloat computes float(acc) * (a_scale * b_scale) with a_scale = 1.0, i.e.
    float(acc) * c; the per-row scale is one Mul after it (the op takes only a scalar a_scale).
    kernel "u8u8" stores the weight as uint8 Wq + 128 with zero point 128: the same integers.
    """
    from onnx import helper

    if kernel == "u8u8":
        w = sub.const((wq.astype(np.int16) + 128).astype(np.uint8), "wq")
        wzp = [sub.const(np.uint8(128), "wzp")]
    else:
        w, wzp = sub.const(wq, "wq"), []
    inputs = [u, w, sub.const(np.float32(1.0), "one"), sub.const(c, "w_scale"),
              sub.const(np.uint8(spec.zero_point), "zp"), *wzp]
    y = sub.name("qmatmul")
    sub.nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [y], name=y, domain=MS_DOMAIN))
    return sub.op("Mul", [y, s], "dequant")


def onnx_gather(sub, ids: str, eq: np.ndarray, scale: np.ndarray) -> str:
    """Embedding lookup from an int8 table: ids int64 [...] -> float32 [..., H]; bits of `gather_reference`."""
    rows = sub.op("Cast", [sub.op("Gather", [sub.const(eq, "table_q"), ids], "rows_q", axis=0)], "rows_f", to=1)
    sc = sub.op("Unsqueeze", [sub.op("Gather", [sub.const(scale, "table_scale"), ids], "row_scale", axis=0),
                              sub.const(np.array([-1], np.int64), "ax")], "row_scale3")
    return sub.op("Mul", [rows, sc], "rows")

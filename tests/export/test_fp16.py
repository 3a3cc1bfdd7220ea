"""The fp16 variant's data-flow rules (export/fp16.py) on the decoder families' graphs: RMSNorm statistics
and rotary tables stay float32, fp32 tensors saturate instead of overflowing where fp16 nodes read them.

Two executors, on CPU (the fp16 path is untested on a GPU):
  - onnx's ReferenceEvaluator computes every op in the type the graph gives it, as a strongly typed TensorRT
    network does; it shows fp16 overflow.
  - onnxruntime's CPU EP has no fp16 kernels for Pow, ReduceMean, Add, Mul, MatMul...: it computes them in
    fp32 and drops the fp16 round trips between them, so a square overflowing fp16 does not show there. The
    rounding of Casts and of data-movement ops (Concat, Reshape, ...) is real there, so the positions'
    rounding does: the rotary test runs on it (3000 tokens would take minutes on the ReferenceEvaluator).
The existing fp16 tests (MiniLM: LayerNormalization, pooling) are in test_tensorrt_plan.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from stableembed.export.fp16 import KERNEL_PREFIX, to_fp16

from tiny_models import Case

QWEN3 = Case("qwen3-lasttoken", arch="qwen3", pooling=("lasttoken",))
GEMMA3 = Case("gemma3-mean", arch="gemma3")
MODERNBERT = Case("modernbert-mean", arch="modernbert")
# fp16 variant against the fp32 graph, on the same executor
MIN_COSINE, MAX_ABS_DIFF = 0.999, 0.05


def _load(tiny_zoo, case: Case) -> onnx.ModelProto:
    art, _ = tiny_zoo.artifact(case)
    return onnx.load(str(art / "model.onnx"))


def _types(model) -> dict[str, int]:
    g = shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output) + list(g.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _scaled(model, names: set[str], factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found = [i for i in out.graph.initializer if i.name in names]
    assert len(found) == len(names), [i.name for i in found]
    for init in found:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return out


def _compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |diff|, min cosine) of rows; NaN cosine (a zero or non-finite row) reads as -1."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        return float(np.abs(out - ref).max()), float(np.nan_to_num(cos, nan=-1.0).min())


def _ort(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fused RMSNorm
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ----------------------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("case", [QWEN3, GEMMA3], ids=lambda c: c.arch)
def test_rmsnorm_statistics_compute_in_fp32(tiny_zoo, case) -> None:
    f16 = to_fp16(_load(tiny_zoo, case))
    types = _types(f16)
    transformer = [n for n in f16.graph.node if not n.name.startswith(KERNEL_PREFIX)]
    stats = [n for n in transformer if n.op_type in ("Pow", "ReduceMean", "Sqrt")]
    assert len(stats) >= 9  # three per RMSNorm, several RMSNorms
    assert all(types[n.output[0]] == TensorProto.FLOAT for n in stats), \
        [n.name for n in stats if types[n.output[0]] != TensorProto.FLOAT]
    # fp32 stays with the statistics: the projections are still fp16
    matmuls = [n for n in transformer if n.op_type == "MatMul"]
    assert matmuls and all(types[n.output[0]] == TensorProto.FLOAT16 for n in matmuls)


@pytest.mark.parametrize("case", [QWEN3, GEMMA3, MODERNBERT], ids=lambda c: c.arch)
def test_rotary_tables_compute_in_fp32(tiny_zoo, case) -> None:
    f16 = to_fp16(_load(tiny_zoo, case))
    types = _types(f16)
    producer = {o: n for n in f16.graph.node for o in n.output}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    stack = [n for n in f16.graph.node if n.op_type in ("Cos", "Sin")]
    assert len(stack) >= 2
    seen: dict[str, onnx.NodeProto] = {}
    while stack:  # Cos/Sin and every ancestor through float tensors
        node = stack.pop()
        if node.name in seen:
            continue
        seen[node.name] = node
        stack.extend(producer[x] for x in node.input if x in producer and types.get(x) in floats)
    assert {n.op_type for n in seen.values()} >= {"Cos", "Sin", "Mul", "Cast"}  # angles, positions as float
    assert all(types[o] == TensorProto.FLOAT for n in seen.values() for o in n.output if types.get(o) in floats), \
        sorted(n.name for n in seen.values() if any(types.get(o) == TensorProto.FLOAT16 for o in n.output))


# --------------------------------------------------------------------------------------------------- numbers

def test_large_activations_do_not_overflow_the_rmsnorms(tiny_zoo) -> None:
    """Embeddings scaled by 1e4 (|hidden| up to ~2000, RMS ~540: x^2 ~ 3e5 > 65504), computed op for op
    in the graph's types (ReferenceEvaluator). Measured: fp16 variant max |diff| 1.8e-3, cosine 0.9999998;
    before the fix every RMSNorm gave 0 (mean(x^2) = inf) and so did the embeddings (max |diff| 2.4 = the
    largest reference value, cosine undefined)."""
    model = _scaled(_load(tiny_zoo, QWEN3), {"inner.embed_tokens.weight"}, 1e4)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 500, (3, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :10] = 0  # a left-padded row
    feeds = {"input_ids": ids, "attention_mask": mask}
    table = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "inner.embed_tokens.weight")
    assert np.sqrt((table[ids] ** 2).mean(-1)).min() > 300  # every token's RMS: its square overflows fp16
    ref = ReferenceEvaluator(model).run(None, feeds)[0]
    out = ReferenceEvaluator(to_fp16(model)).run(None, feeds)[0]
    assert np.isfinite(out).all()
    diff, cos = _compare(out, ref)
    assert diff <= MAX_ABS_DIFF and cos >= MIN_COSINE, (diff, cos)


def test_rotary_positions_beyond_2048_stay_exact(tiny_zoo) -> None:
    """One 3000-token row (the graph's rotary tables have no length limit; the manifest's max_length only
    bounds the tokenizer) on onnxruntime CPU. q_norm/k_norm weights x3 sharpen attention so that the keys'
    rotations matter (with near-uniform attention the output hardly depends on positions). Measured: fp16
    variant max |diff| 0.023, cosine 0.99993; before the fix (positions and angles in fp16: 3001 -> 3000,
    angle error up to 1 rad) max |diff| 0.94, cosine 0.85."""
    base = _load(tiny_zoo, QWEN3)
    norms = {i.name for i in base.graph.initializer if i.name.endswith(("q_norm.weight", "k_norm.weight"))}
    model = _scaled(base, norms, 3.0)
    ids = np.random.default_rng(0).integers(10, 500, (1, 3000)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref, out = _ort(model, feeds), _ort(to_fp16(model), feeds)
    diff, cos = _compare(out, ref)
    assert diff <= MAX_ABS_DIFF and cos >= MIN_COSINE, (diff, cos)


# -------------------------------------------------------------------------------------------- tiny graphs

def _graph(nodes, inits=(), x_type=TensorProto.FLOAT, y_shape=(1, 4)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fp32_tensors_saturate_where_fp16_nodes_read_them() -> None:
    """x^2 (fp32, 90000) read by an fp16 Mul: clipped to 65504 before the Cast, not inf."""
    model = _graph([
        helper.make_node("Mul", ["x", "one"], ["h"]),  # fp16 activations: 300 and 0.3
        helper.make_node("Mul", ["x", "milli"], ["small"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),  # fp32: 90000
        helper.make_node("Mul", ["sq", "small"], ["prod"]),  # fp16 again: reads sq through Clip + Cast
        helper.make_node("Mul", ["prod", "one"], ["y"], name=f"{KERNEL_PREFIX}out"),
    ], [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("one", 1.0), ("two", 2.0), ("milli", 1e-3))])
    f16 = to_fp16(model)
    types = _types(f16)
    assert types["sq"] == TensorProto.FLOAT and types["prod"] == TensorProto.FLOAT16
    y = ReferenceEvaluator(f16).run(None, {"x": np.full((1, 4), 300, np.float32)})[0]
    assert np.isfinite(y).all() and np.allclose(y, 65504 * 0.3, rtol=2e-3), y


def test_rotary_table_depending_on_activations_is_refused() -> None:
    """Cos of hidden states (looked up from a weight table) is no rotary table: keeping its ancestors fp32
    would take the transformer with it, so the fp16 variant refuses the graph."""
    model = _graph([
        helper.make_node("Gather", ["table", "x"], ["emb"]),
        helper.make_node("Cos", ["emb"], ["c"]),
        helper.make_node("ReduceSum", ["c"], ["y"], name=f"{KERNEL_PREFIX}out", keepdims=0),
    ], [numpy_helper.from_array(np.ones((8, 4), np.float32), "table")], x_type=TensorProto.INT64, y_shape=())
    with pytest.raises(ValueError, match="depends on the activations"):
        to_fp16(model)

"""TensorRT build, CPU side: engine and profile planning, the graph TensorRT parses (op set, opset,
3-D MatMuls, static variants), the fp16 variant, `build-trt --dry-run`, and the missing-extra error.
Nothing here needs TensorRT or a GPU; the engine builds themselves are in tests/runtime/test_gpu_backends.py
(marked gpu)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from stableembed.cli import main
from stableembed.export.artifact import default_buckets
from stableembed.export.fp16 import KERNEL_PREFIX, precision_report, to_fp16
from stableembed.export.tensorrt import (
    TRT_OPS,
    graph_problems,
    matmuls_to_3d,
    plan_profiles,
    plan_static_engines,
    prepare_graph,
    static_variant,
)
from stableembed.runtime.backends._shapes import Profile
from stableembed.runtime.verify import same_bits

from tiny_models import Case

DENSE = Case("bert-dense-tanh-normalize", dense=((24, "Tanh"),), normalize=True)
TEXTS = ["hello world", "a somewhat longer sentence about embeddings on graphics processors", "", "ünïcödé 🚀"]


def _feeds(folder, texts=TEXTS):
    from stableembed import Encoder
    from stableembed.runtime.schedule import Batch

    enc = Encoder(folder)
    encs = enc.tokenizer.encode(texts)
    length = max(len(e.ids) for e in encs)
    return enc.tokenizer.feeds(encs, Batch(tuple(range(len(texts))), length, len(texts)))


def _run(model, feeds, optimize: bool = True):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:  # run the graph's own ops: no fusion that could differ between two graphs
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ------------------------------------------------------------------------------------------------ planning

def test_static_engines_one_per_length_at_its_largest_batch() -> None:
    buckets = default_buckets(256)  # 16..256, each at batch 1, 8, 32
    assert plan_static_engines(buckets) == [(32, 16), (32, 32), (32, 64), (32, 128), (32, 256)]
    assert plan_static_engines([[1, 16], [4, 16], [2, 64]]) == [(4, 16), (2, 64)]
    assert plan_static_engines(buckets, "all") == sorted({tuple(b) for b in buckets}, key=lambda s: (s[1], s[0]))
    with pytest.raises(ValueError, match="static_batches"):
        plan_static_engines(buckets, "some")


def test_profiles_default_parsed_and_checked() -> None:
    assert plan_profiles(None, 256, default_buckets(256)) == [Profile((1, 1), (32, 128), (64, 256))]
    assert plan_profiles(None, 64, [[128, 64]]) == [Profile((1, 1), (32, 64), (128, 64))]
    two = plan_profiles("1x1:8x64:16x128, 16x1:64x128:128x256", 256, [])
    assert two == [Profile((1, 1), (8, 64), (16, 128)), Profile((16, 1), (64, 128), (128, 256))]
    assert plan_profiles(two, 256, []) == two
    with pytest.raises(ValueError, match="MINBxMINL"):
        plan_profiles("1x1:8x64", 256, [])
    with pytest.raises(ValueError, match="min <= opt <= max"):
        plan_profiles("1x1:64x64:32x128", 256, [])
    with pytest.raises(ValueError, match="max_length"):
        plan_profiles("1x1:8x64:16x512", 256, [])


# ----------------------------------------------------------------------------------- the graph TRT parses

def test_real_graph_uses_only_standard_ops_tensorrt_parses(minilm_artifact) -> None:
    model = onnx.load(str(minilm_artifact / "model.onnx"))
    graph = prepare_graph(model)
    assert [(i.domain, i.version) for i in graph.opset_import] == [("", 17)]
    assert {n.domain for n in graph.graph.node} == {""}  # no onnxruntime contrib ops (com.microsoft)
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= TRT_OPS, ops - TRT_OPS
    assert graph_problems(graph, opset=17) == []
    assert graph_problems(prepare_graph(model, fp16=True), opset=17) == []


def test_graph_problems_name_what_tensorrt_would_not_take() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="dense"),
             helper.make_node("FastGelu", ["m"], ["y"], name="gelu", domain="com.microsoft")]
    model = helper.make_model(helper.make_graph(nodes, "g", [a], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    problems = "\n".join(graph_problems(model, opset=17))
    assert "non-standard domain 'com.microsoft'" in problems
    assert "opset 21 is outside TensorRT's" in problems
    assert "rank 2" in problems and "dense" in problems
    model.opset_import[0].version = 18
    assert "opset 18, the manifest says 17" in "\n".join(graph_problems(model, opset=17))


def test_dense_matmuls_become_3d_with_the_same_results(tiny_zoo) -> None:
    art, _ = tiny_zoo.artifact(DENSE)
    model = onnx.load(str(art / "model.onnx"))
    assert any("rank 2" in p for p in graph_problems(model))  # the Dense layer's MatMul on [batch, dim]
    graph = matmuls_to_3d(model)
    assert graph_problems(graph, opset=17) == []
    added = [n for n in graph.graph.node if n.op_type in ("Unsqueeze", "Squeeze") and "/to" in n.name]
    assert added and all(n.name.startswith(KERNEL_PREFIX) for n in added)  # still kernel nodes (fp32 in fp16)
    feeds = _feeds(art)
    # The rewrite claims the same computation (one GEMM over the batch rows either way): the same bits,
    # op for op and with onnxruntime's optimizations on.
    assert same_bits(_run(graph, feeds, optimize=False), _run(model, feeds, optimize=False)).all()
    assert same_bits(_run(graph, feeds), _run(model, feeds)).all()


def test_static_variant_fixes_the_shape_and_computes_the_same(minilm_artifact) -> None:
    model = prepare_graph(onnx.load(str(minilm_artifact / "model.onnx")))
    feeds = _feeds(minilm_artifact)
    rows, length = feeds["input_ids"].shape
    fixed = static_variant(model, (rows, length))
    for value in fixed.graph.input:
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [rows, length]
    assert fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value == rows
    onnx.checker.check_model(fixed)
    # Fixing the shape changes no op: the same bits as the dynamic graph on the same feeds, op for op.
    # (With onnxruntime's own graph optimizations on, known shapes enable other fusions and the two differ
    # by ~4e-8: an onnxruntime optimizer effect, so the claim is checked with them off.)
    assert same_bits(_run(fixed, feeds, optimize=False), _run(model, feeds, optimize=False)).all()


# --------------------------------------------------------------------------------------- the fp16 variant

def test_fp16_variant_keeps_pooling_and_normalization_fp32(minilm_artifact) -> None:
    model = onnx.load(str(minilm_artifact / "model.onnx"))
    f16 = to_fp16(model)
    report = precision_report(f16)
    assert set(report["kernels"]) == {"FLOAT"}  # every float the kernels compute is float32
    assert report["kernels"] == precision_report(model)["kernels"]
    assert "FLOAT16" in report["transformer"]
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in onnx.shape_inference.infer_shapes(f16).graph.value_info}
    matmuls = [n for n in f16.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.output[0]] == TensorProto.FLOAT16 for n in matmuls)
    norms = [n for n in f16.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types[n.output[0]] == TensorProto.FLOAT for n in norms)
    assert f16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {i.name: i.data_type for i in f16.graph.initializer}
    for n in f16.graph.node:  # kernel weights and constants were left float32
        if n.name.startswith(KERNEL_PREFIX):
            assert all(inits.get(x, TensorProto.FLOAT) != TensorProto.FLOAT16 for x in n.input), n.name
    assert model.graph.node[0].name == onnx.load(str(minilm_artifact / "model.onnx")).graph.node[0].name


def test_fp16_variant_runs_on_onnxruntime_cpu_within_a_loose_tolerance(minilm_artifact) -> None:
    """onnxruntime's CPU EP runs fp16 MatMuls; the stated tolerance for the fp16 variant against the fp32
    graph is max |diff| <= 2e-3 and cosine >= 0.999 (measured here: about 1e-4 and 0.9999998)."""
    model = onnx.load(str(minilm_artifact / "model.onnx"))
    feeds = _feeds(minilm_artifact)
    ref, out = _run(model, feeds), _run(to_fp16(model), feeds)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 2e-3
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999


# -------------------------------------------------------------------------------------------------- CLI

def test_build_trt_dry_run_prints_the_plan(minilm_artifact, capsys) -> None:
    assert main(["build-trt", str(minilm_artifact), "--dry-run", "--fp16", "--profiles", "1x1:8x64:16x128"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["precision"] == "fp16" and plan["problems"] == []
    assert [e["shape"] for e in plan["static"]] == [[32, 16], [32, 32], [32, 64], [32, 128], [32, 256]]
    assert plan["dynamic"]["profiles"] == [{"min": [1, 1], "opt": [8, 64], "max": [16, 128]}]
    assert plan["graph"]["opset"] == 17


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_trt_without_tensorrt_names_the_extra(minilm_artifact, capsys) -> None:
    assert main(["build-trt", str(minilm_artifact)]) == 2
    assert "pip install 'stableembed[tensorrt]'" in capsys.readouterr().err

"""Build TensorRT engines into an artifact: `stableembed build-trt ARTIFACT` (needs the `tensorrt` extra).

NOT RUN ON A GPU YET. The planning (static engines, optimization profiles), the graph TensorRT parses
(preparation and its op-set check) and the manifest section are pure functions tested on CPU; the
builder (`build_engines`) was written against TensorRT 10's documented Python API and has not run.

What is built, from the artifact's own graph (model.onnx):
  - the graph TensorRT parses (`prepare_graph`): fp32, or with --fp16 the fp16 variant (export/fp16.py:
    transformer in float16, pooling/Dense/normalization in float32); 2-D MatMuls (Dense layers on
    [batch, dim]) rewritten as 3-D so the batch axis stays a batch (distributive) axis of every MatMul.
    It must use only standard ONNX ops that TensorRT's parser supports (`graph_problems`);
  - static engines (`plan_static_engines`): for each length of the manifest's fixed buckets, one engine
    at that length's largest bucket batch (smaller batches run in it with filler rows: a text of a
    length bucket always runs at one shape, invariant across companions and batch sizes by
    construction); with static_batches="all", one engine per bucket;
  - one dynamic engine whose optimization profiles (min/opt/max over batch and length) come from
    --profiles or `default_profiles`;
  - a timing cache (trt-timing.cache), reused by the next rebuild on the same GPU and TensorRT.
Every engine is built from a strongly typed network (TensorRT 10.12+ deprecates, 11 removes, the
precision flags) with TF32 cleared (it is on by default) and, where this TensorRT has it
(>= 10.12), BuilderFlag.DISTRIBUTIVE_INDEPENDENCE. The manifest's "tensorrt" section records the
engines, shapes, flags, TensorRT version, GPU name and compute capability; files get sha256s as usual.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._extras import require
from ..runtime.backends._shapes import (
    Profile,
    check_profiles,
    default_profiles,
    parse_profiles,
    run_shapes,
)
from ..runtime.backends.tensorrt import SECTION, engine_mismatch, read_section
from ..runtime.manifest import Manifest, load_manifest
from .artifact import write_manifest

TIMING_CACHE = "trt-timing.cache"
STANDARD_DOMAINS = ("", "ai.onnx")
# Opsets TensorRT 10.0's ONNX parser documents (9..20, inclusive); later 10.x releases extend the top.
TRT_OPSETS = (9, 20)
# Standard ONNX ops TensorRT 10's ONNX parser lists as supported (onnx-tensorrt docs/operators.md).
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Inputs TensorRT's parser needs as constants (initializers or Constant outputs): op -> input index.
CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,), "Pad": (3,)}


# ---------------------------------------------------------------------------------------------- planning

def plan_static_engines(buckets: Sequence[Sequence[int]], static_batches: str = "largest") -> list[tuple[int, int]]:
    """Static engine shapes (batch, length): the run shapes of the manifest's fixed buckets, the same the
    runtime routes fixed-mode batches to (runtime/backends/_shapes.py)."""
    return run_shapes(buckets, static_batches)


def plan_profiles(spec: str | Sequence[Profile] | None, max_length: int,
                  buckets: Sequence[Sequence[int]]) -> list[Profile]:
    """The dynamic engine's optimization profiles: parsed from `spec` ('1x1:32x128:64x256,...') or the default."""
    if spec is None or spec == "":
        profiles = default_profiles(max_length, buckets)
    elif isinstance(spec, str):
        profiles = parse_profiles(spec)
    else:
        profiles = list(spec)
    return check_profiles(profiles, max_length)


def engine_file(precision: str, shape: tuple[int, int] | None) -> str:
    return f"trt-{precision}-dynamic.engine" if shape is None else f"trt-{precision}-static-{shape[0]}x{shape[1]}.engine"


# ------------------------------------------------------------------------------------- the parsed graph

def _types(model) -> dict[str, tuple[int, int | None]]:
    """tensor name -> (elem type, rank) after shape inference."""
    from onnx import shape_inference

    g = shape_inference.infer_shapes(model).graph
    out = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        out[vi.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, len(init.dims))
    return out


def matmuls_to_3d(model):
    """Rewrite each MatMul whose first input is 2-D ([batch, k], the Dense layers) as Unsqueeze -> 3-D
    MatMul -> Squeeze, so batch is a batch axis of the MatMul (distributive) rather than its row axis."""
    onnx = require("onnx", "tensorrt")
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = _types(out)
    nodes, axes_added = [], False
    for node in out.graph.node:
        if node.op_type == "MatMul" and types.get(node.input[0], (0, None))[1] == 2:
            prefix = node.name or node.output[0]
            a3, y3 = f"{prefix}/a3", f"{prefix}/y3"
            nodes.append(helper.make_node("Unsqueeze", [node.input[0], "stableembed/axis1"], [a3], name=f"{prefix}/to3d"))
            nodes.append(helper.make_node("MatMul", [a3, node.input[1]], [y3], name=prefix))
            nodes.append(helper.make_node("Squeeze", [y3, "stableembed/axis1"], list(node.output), name=f"{prefix}/to2d"))
            axes_added = True
        else:
            nodes.append(node)
    if axes_added:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        out.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "stableembed/axis1"))
    return out


def prepare_graph(model, fp16: bool = False):
    """The graph TensorRT parses, from the artifact's model (onnx.ModelProto)."""
    from .fp16 import to_fp16

    prepared = matmuls_to_3d(model)
    return to_fp16(prepared) if fp16 else prepared


def _prepared(manifest, fp16: bool):
    """(the graph TensorRT would parse, why it could not): the fp16 variant is made only from an fp32 graph
    without problems (an int8 artifact's contrib nodes would otherwise fail inside the conversion)."""
    from .fp16 import to_fp16

    onnx = require("onnx", "tensorrt")
    opset = int(manifest.raw.get("opset", 17))
    graph = prepare_graph(onnx.load(str(manifest.model_file)))
    problems = graph_problems(graph, opset)
    if fp16 and not problems:
        graph = to_fp16(graph)
        problems = graph_problems(graph, opset)
    return graph, problems


def graph_problems(model, opset: int | None = None) -> list[str]:
    """Why TensorRT's parser could not take this graph as we need it (empty when it can): non-standard
    domains or ops (e.g. onnxruntime contrib ops), an opset outside TensorRT's range or other than the
    manifest's, non-constant axes, MatMuls whose first input has rank < 3."""
    problems = []
    for imp in model.opset_import:
        if imp.domain not in STANDARD_DOMAINS:
            problems.append(f"imports non-standard domain {imp.domain!r} (opset {imp.version})")
        elif not TRT_OPSETS[0] <= imp.version <= TRT_OPSETS[1]:
            problems.append(f"opset {imp.version} is outside TensorRT's {TRT_OPSETS[0]}..{TRT_OPSETS[1]}")
        elif opset is not None and imp.version != opset:
            problems.append(f"opset {imp.version}, the manifest says {opset}")
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    types = _types(model)
    for node in model.graph.node:
        where = f"node {node.name or node.output[0]} ({node.domain + '.' if node.domain else ''}{node.op_type})"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(f"{where}: non-standard domain {node.domain!r}")
        elif node.op_type not in TRT_OPS:
            problems.append(f"{where}: not an op TensorRT's ONNX parser supports")
        for idx in CONSTANT_INPUTS.get(node.op_type, ()):
            if len(node.input) > idx and node.input[idx] and node.input[idx] not in constants:
                problems.append(f"{where}: input {idx} (axes) must be a constant for TensorRT")
        if node.op_type == "MatMul":
            rank = types.get(node.input[0], (0, None))[1]
            if rank is None or rank < 3:
                problems.append(f"{where}: first input has rank {rank}; keep MatMuls >= 3-D so batch stays "
                                f"a distributive axis")
    return problems


def graph_summary(model) -> dict[str, Any]:
    return {"opset": max((i.version for i in model.opset_import if i.domain in STANDARD_DOMAINS), default=None),
            "ops": sorted({n.op_type for n in model.graph.node}),
            "sha256": hashlib.sha256(model.SerializeToString()).hexdigest()}


def static_variant(model, shape: tuple[int, int]):
    """The graph with its [batch, length] inputs (and [batch, dim] output) fixed to `shape`."""
    onnx = require("onnx", "tensorrt")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = shape
    for value in out.graph.output:
        value.type.tensor_type.shape.dim[0].dim_value = shape[0]
    return out


def plan_build(folder: str | Path, *, fp16: bool = False, profiles: str | Sequence[Profile] | None = None,
               static_batches: str = "largest") -> dict[str, Any]:
    """What build_engines would build (no TensorRT needed): engines, profiles, the parsed graph's check."""
    manifest = load_manifest(folder)
    precision = "fp16" if fp16 else "fp32"
    graph, problems = _prepared(manifest, fp16)
    return {"artifact": str(manifest.folder), "precision": precision,
            "static": [{"file": engine_file(precision, s), "shape": list(s)}
                       for s in plan_static_engines(manifest.fixed_buckets, static_batches)],
            "dynamic": {"file": engine_file(precision, None),
                        "profiles": [p.as_dict() for p in plan_profiles(profiles, manifest.max_length,
                                                                        manifest.fixed_buckets)]},
            "graph": graph_summary(graph), "problems": problems}


# ----------------------------------------------------------------------------------------------- building

def _build_one(trt, builder, logger, graph_bytes: bytes, profiles: Sequence[Profile] | None, cache,
               workspace: int | None) -> tuple[bytes, bool]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 MatMuls would round inputs to 10 bits
    distributive = hasattr(trt.BuilderFlag, "DISTRIBUTIVE_INDEPENDENCE")
    if distributive:
        config.set_flag(trt.BuilderFlag.DISTRIBUTIVE_INDEPENDENCE)
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    # False means TensorRT did not take the cache (e.g. one from another TensorRT or GPU): say so rather
    # than build without it silently.
    if not config.set_timing_cache(cache, False):
        raise RuntimeError("TensorRT refused the timing cache (built with another TensorRT or GPU?); delete "
                           f"{TIMING_CACHE} from the artifact or pass --rebuild")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for p in profiles or ():
        profile = builder.create_optimization_profile()
        for name in inputs:
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above)")
    return bytes(plan), distributive


def build_engines(folder: str | Path, *, fp16: bool = False, profiles: str | Sequence[Profile] | None = None,
                  static_batches: str = "largest", rebuild: bool = False, static: bool = True,
                  workspace_gb: float | None = None, log: Callable[[str], None] = print,
                  if_stale: bool = False, dynamic: bool = True) -> Manifest:
    """Build the static and dynamic engines into the artifact `folder`, record them, return its manifest.

    if_stale: when the artifact already has engines of this precision built with this TensorRT on this
    kind of GPU, keep them and return; otherwise rebuild (what a deployment step runs on each machine).
    dynamic=False builds the static engines only (fixed mode; dynamic batches are then refused)."""
    from ..runtime.backends._cuda import device_info
    from ..runtime.backends.tensorrt import _require_tensorrt

    require("onnx", "tensorrt")  # the extra, named before TensorRT is looked for
    trt = _require_tensorrt()
    manifest = load_manifest(folder)
    folder = manifest.folder
    old = read_section(manifest.raw)
    precision = "fp16" if fp16 else "fp32"
    dev = device_info()
    if if_stale and old is not None:
        diff = engine_mismatch(old, trt.__version__, dev.name, dev.compute_capability)
        if diff is None and old.precision == precision:
            log(f"{folder}: engines match this machine (TensorRT {old.tensorrt_version}, {old.gpu}); kept")
            return manifest
        log(f"{folder}: rebuilding engines ({diff or f'precision {old.precision} -> {precision}'})")
        rebuild = True
    if old is not None and not rebuild:
        raise FileExistsError(f"{folder} already has TensorRT engines (TensorRT {old.tensorrt_version} on "
                              f"{old.gpu}); pass --rebuild to replace them")
    graph, problems = _prepared(manifest, fp16)
    if problems:
        raise ValueError("the graph TensorRT would parse is not usable: " + "; ".join(problems))
    shapes = plan_static_engines(manifest.fixed_buckets, static_batches) if static else []
    plan_p = plan_profiles(profiles, manifest.max_length, manifest.fixed_buckets)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = b""
    if old is not None and (folder / TIMING_CACHE).is_file() and old.tensorrt_version == trt.__version__ \
            and old.gpu == dev.name and old.compute_capability == dev.compute_capability:
        cache_bytes = (folder / TIMING_CACHE).read_bytes()
    cache_config = builder.create_builder_config()  # kept alive while the cache is in use
    cache = cache_config.create_timing_cache(cache_bytes)
    workspace = int(workspace_gb * (1 << 30)) if workspace_gb else None

    work = folder / ".trt-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        engines, distributive = [], True
        jobs = [(s, static_variant(graph, s).SerializeToString(), None) for s in shapes]
        if dynamic:
            jobs.append((None, graph.SerializeToString(), plan_p))
        if not jobs:
            raise ValueError("nothing to build: static=False and dynamic=False")
        for shape, graph_bytes, profs in jobs:
            what = f"static {shape[0]}x{shape[1]}" if shape else f"dynamic ({len(profs)} profiles)"
            log(f"building {precision} engine {what} ...")
            t0 = _dt.datetime.now()
            plan, di = _build_one(trt, builder, logger, graph_bytes, profs, cache, workspace)
            distributive = distributive and di
            name = engine_file(precision, shape)
            (work / name).write_bytes(plan)
            engines.append({"file": name, "kind": "static", "shape": list(shape)} if shape else
                           {"file": name, "kind": "dynamic", "profiles": [p.as_dict() for p in profs]})
            log(f"  {name}: {len(plan):,} bytes in {(_dt.datetime.now() - t0).total_seconds():.1f} s")
        (work / TIMING_CACHE).write_bytes(bytes(cache.serialize()))

        raw = dict(manifest.raw)
        new_files = {f.name for f in work.iterdir()}
        for f in work.iterdir():
            os.replace(f, folder / f.name)
        for stale in ([e["file"] for e in old.raw["engines"]] if old else []):
            if stale not in new_files:
                (folder / stale).unlink(missing_ok=True)
        raw[SECTION] = {
            "tensorrt_version": trt.__version__,
            "gpu": dev.name,
            "compute_capability": dev.compute_capability,
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "strongly_typed": True,
            "tf32": False,
            "distributive_independence": distributive,
            "static_batches": static_batches if static else "none",
            "graph": graph_summary(graph),
            "timing_cache": TIMING_CACHE,
            "engines": engines,
        }
        write_manifest(folder, raw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_manifest(folder)

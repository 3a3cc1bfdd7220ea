"""The fp16 variant of an artifact's graph, for TensorRT's strongly typed networks.

TensorRT 10.12 deprecates (and 11 removes) the builder's precision flags: a network is strongly typed,
each tensor computes in the type the graph gives it. So the fp16 variant is a graph of its own: the
transformer's float tensors, weights and constants become float16, while
  - every node of our kernels (pooling, Dense layers, normalization; named "stableembed/...") and the
    final output stay float32: Casts to float32 sit where the transformer hands over to them, so the
    pooling sums and the normalization are the same fp32 tree reductions as in the fp32 graph;
  - LayerNormalization stays float32 (Cast in, Cast out): its variance overflows easily in fp16.
Weights and constants beyond fp16's range are clipped to +-65504 (the attention mask's float32 minimum
becomes -65504, which still drives softmax to exactly 0).
"""

from __future__ import annotations

import numpy as np

from .._extras import require

KERNEL_PREFIX = "stableembed/"
KEEP_FP32_OPS = frozenset({"LayerNormalization"})
FP16_MAX = 65504.0


def _fp16_array(arr: np.ndarray) -> np.ndarray:
    return np.clip(arr.astype(np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)


def keeps_fp32(node, graph_outputs: set[str]) -> bool:
    """Nodes that compute in float32 in the fp16 variant."""
    return (node.name.startswith(KERNEL_PREFIX) or node.op_type in KEEP_FP32_OPS
            or any(o in graph_outputs for o in node.output))


def to_fp16(model):
    """Return the fp16 variant of `model` (an onnx.ModelProto; the input is not modified)."""
    onnx = require("onnx", "tensorrt")
    from onnx import AttributeProto, TensorProto, helper, numpy_helper, shape_inference

    FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):  # e.g. an int8 artifact's onnxruntime contrib nodes
            raise ValueError(f"fp16 variant: node {node.name or node.output[0]} ({node.domain}.{node.op_type}) "
                             f"is not a standard ONNX op; only fp32 artifacts have an fp16 variant")
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"fp16 variant: node {node.name} ({node.op_type}) has a subgraph; not supported")
    inferred = shape_inference.infer_shapes(out).graph
    elem = {vi.name: vi.type.tensor_type.elem_type
            for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    inits = {i.name: i for i in graph.initializer}
    elem.update({name: i.data_type for name, i in inits.items()})
    graph_outputs = {o.name for o in graph.output}

    producer = {i.name: 32 for i in graph.input}
    for node in graph.node:
        for o in node.output:
            producer[o] = 32 if keeps_fp32(node, graph_outputs) else 16

    nodes, casts, fp16_inits, new_inits = [], {}, {}, []
    for node in graph.node:
        want = 32 if keeps_fp32(node, graph_outputs) else 16
        for idx, name in enumerate(node.input):
            if not name or elem.get(name) != FLOAT:
                continue
            if name in inits:
                if want == 16:
                    if name not in fp16_inits:
                        arr = _fp16_array(numpy_helper.to_array(inits[name]))
                        fp16_inits[name] = f"{name}/fp16"
                        new_inits.append(numpy_helper.from_array(arr, fp16_inits[name]))
                    node.input[idx] = fp16_inits[name]
                continue
            if name not in producer:
                raise ValueError(f"fp16 variant: tensor {name!r} has no producer")
            if producer[name] != want:
                key = (name, want)
                if key not in casts:
                    casts[key] = f"{name}/as_fp{want}"
                    nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"fp16/{casts[key]}",
                                                  to=FLOAT if want == 32 else FLOAT16))
                node.input[idx] = casts[key]
        if want == 16:
            _attributes_to_fp16(node, FLOAT, FLOAT16, numpy_helper)
        nodes.append(node)

    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    onnx.checker.check_model(out)
    return out


def _attributes_to_fp16(node, FLOAT: int, FLOAT16: int, numpy_helper) -> None:
    """Nodes that create float tensors from attributes: make them create float16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(_fp16_array(numpy_helper.to_array(attr.t)), attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            raise ValueError(f"fp16 variant: Constant {node.name} uses {attr.name}; not supported")
        elif attr.name in ("dtype", "to") and attr.i == FLOAT:
            raise ValueError(f"fp16 variant: {node.op_type} {node.name} creates float32 by attribute; not supported")


def precision_report(model) -> dict[str, dict[str, int]]:
    """{"kernels": {elem type name: count}, "transformer": {...}} of float outputs, for checks and tests."""
    onnx = require("onnx", "tensorrt")
    from onnx import TensorProto, shape_inference

    inferred = shape_inference.infer_shapes(model).graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.value_info) + list(inferred.output)}
    graph_outputs = {o.name for o in model.graph.output}
    report: dict[str, dict[str, int]] = {"kernels": {}, "transformer": {}}
    for node in model.graph.node:
        part = "kernels" if node.name.startswith(KERNEL_PREFIX) or set(node.output) & graph_outputs else "transformer"
        for o in node.output:
            t = elem.get(o)
            if t in (TensorProto.FLOAT, TensorProto.FLOAT16):
                name = onnx.TensorProto.DataType.Name(t)
                report[part][name] = report[part].get(name, 0) + 1
    return report

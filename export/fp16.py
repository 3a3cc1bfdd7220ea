"""The fp16 variant of an artifact's graph, for TensorRT's strongly typed networks.

TensorRT 10.12 deprecates (and 11 removes) the builder's precision flags: a network is strongly typed,
each tensor computes in the type the graph gives it. So the fp16 variant is a graph of its own: the
transformer's float tensors, weights and constants become float16, except where fp16 is known to break.
Rules, over the graph's data flow (no per-family special case):

  1. fixed fp32: every node of our kernels (pooling, Dense layers, normalization; named "stableembed/..."),
     the nodes that produce the graph's outputs, and LayerNormalization (its variance overflows easily).
     Their outputs are cast to fp16 where fp16 nodes consume them (they do not spread fp32 further).
  2. squares: Pow, ReduceSumSquare, ReduceL2 and a Mul of a tensor by itself compute in fp32. A square
     overflows fp16 (max 65504) for |x| > 255.9, and Qwen/Gemma hidden states routinely exceed that; their
     RMSNorms are exported as separate ops (Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div/Reciprocal -> Mul).
  3. rotary tables: Cos, Sin and all their ancestors through float tensors (positions cast to float,
     inv_freq, positions x inv_freq) compute in fp32: fp16 holds integers exactly only up to 2048, and at
     position 3000 an fp16 angle is off by up to ~1.5 rad. These tables depend on integer inputs (positions)
     and constants only; that is checked (an ancestor that is an activation, i.e. downstream of an embedding
     lookup or a float graph input, is an error: that would put the transformer itself in fp32).
  4. propagation: a node whose float inputs all come from rule-2/3 nodes (at least one) or from constants
     computes in fp32 too (ReduceMean, Add(eps), Sqrt, Reciprocal after a Pow; the cos/sin scaling). Where
     an fp16 activation joins (x * rsqrt(mean(x^2) + eps), q * cos), the node is fp16 again.
  5. constants (initializers, Constant, ConstantOfShape, Casts of integers: nodes without float inputs) are
     made in the precision their consumers compute in, in both when both consume them: an fp16 copy beside
     the fp32 original, never an fp32 value rounded through fp16.
  6. everything else is fp16. A float32 `Cast(to=FLOAT)` of an fp16 node becomes a Cast to FLOAT16; where
     fp32 precision matters, rules 2-4 keep it.
Where an fp32 tensor feeds an fp16 node it is clipped to +-65504 before the Cast, so values beyond fp16's
range saturate instead of becoming inf; fp16 copies of weights and constants are clipped the same way (the
attention mask's float32 minimum, -3.4e38, becomes -65504, which still drives softmax to exactly 0).
"""

from __future__ import annotations

import numpy as np

from .._extras import require

KERNEL_PREFIX = "stableembed/"
KEEP_FP32_OPS = frozenset({"LayerNormalization"})
SQUARE_OPS = frozenset({"Pow", "ReduceSumSquare", "ReduceL2"})
ROTARY_OPS = frozenset({"Cos", "Sin"})
LOOKUP_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
FP16_MAX = 65504.0


def _fp16_array(arr: np.ndarray) -> np.ndarray:
    return np.clip(arr.astype(np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)


def keeps_fp32(node, graph_outputs: set[str]) -> bool:
    """Nodes that compute in float32 in the fp16 variant whatever their inputs (rule 1)."""
    return (node.name.startswith(KERNEL_PREFIX) or node.op_type in KEEP_FP32_OPS
            or any(o in graph_outputs for o in node.output))


def plan_precision(graph, elem: dict[str, int]) -> tuple[list[int], list[set[int]]]:
    """(precision of each node of `graph`: 32 or 16, {precisions wanted} of each constant-making node;
    empty for the others). `elem`: element type of every tensor."""
    from onnx import TensorProto

    nodes = list(graph.node)
    inits = {i.name for i in graph.initializer}
    constants = inits | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    floats = [[x for x in n.input if x and elem.get(x) == TensorProto.FLOAT] for n in nodes]
    computed = [[x for x in f if x not in inits] for f in floats]  # float inputs that are not weights
    fixed = [keeps_fp32(n, graph_outputs) for n in nodes]
    source = [not f and not fixed[i] and any(elem.get(o) == TensorProto.FLOAT for o in nodes[i].output)
              for i, f in enumerate(floats)]

    # Activations: downstream of a float graph input or of a weight table looked up by a computed index.
    activations = {x.name for x in graph.input if elem.get(x.name) == TensorProto.FLOAT}
    for i, n in enumerate(nodes):
        lookup = n.op_type in LOOKUP_OPS and n.input[0] in inits and n.input[1] not in constants
        if lookup or any(x in activations for x in computed[i]):
            activations.update(o for o in n.output if elem.get(o) == TensorProto.FLOAT)

    kept: set[int] = set()  # rules 2-4
    stack = [i for i, n in enumerate(nodes) if n.op_type in ROTARY_OPS and not fixed[i]]
    while stack:  # rule 3: Cos/Sin and their float ancestors
        i = stack.pop()
        if i in kept:
            continue
        if any(o in activations for o in nodes[i].output):
            raise ValueError(f"fp16 variant: node {nodes[i].name} ({nodes[i].op_type}) feeds a Cos/Sin and depends on "
                             f"the activations; rotary tables must depend on positions and constants only")
        kept.add(i)
        stack.extend(producer[x] for x in computed[i])  # (a float graph input is an activation: refused above)
    for i, n in enumerate(nodes):  # rules 2 and 4, in topological order
        if fixed[i] or source[i]:
            continue
        square = n.op_type in SQUARE_OPS or (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1])
        origins = [producer.get(x) for x in computed[i]]
        from_kept = (origins and all(j is not None and (j in kept or source[j]) for j in origins)
                     and any(j in kept and not source[j] for j in origins))
        if square or from_kept:
            kept.add(i)

    precision = [32 if fixed[i] or i in kept else 16 for i in range(len(nodes))]
    wants: list[set[int]] = [set() for _ in nodes]  # rule 5
    for i in range(len(nodes)):
        for x in computed[i]:
            j = producer.get(x)
            if j is not None and source[j]:
                wants[j].add(precision[i])
    for j in range(len(nodes)):
        if source[j]:
            wants[j] = wants[j] or {16}
            precision[j] = 32 if 32 in wants[j] else 16  # the precision of its original output names
    return precision, wants


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
    precision, wants = plan_precision(graph, elem)

    home = {i.name: 32 for i in graph.input}  # the precision each tensor name is made in
    for node, p in zip(graph.node, precision):
        home.update((o, p) for o in node.output)
    fp16_copy: dict[str, str] = {}  # fp32 constant -> its fp16 copy
    new_inits: list = []
    casts: dict[tuple[str, int], str] = {}
    nodes: list = []

    def clip_bound(name: str, value: float) -> str:
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.array(value, np.float32), name)
            new_inits.append(inits[name])
        return name

    def convert(name: str, want: int) -> str:
        """`name` as the consumer computing in `want` reads it."""
        if name in inits:
            if want == 16 and name not in fp16_copy:
                fp16_copy[name] = f"{name}/fp16"
                new_inits.append(numpy_helper.from_array(_fp16_array(numpy_helper.to_array(inits[name])),
                                                         fp16_copy[name]))
            return fp16_copy[name] if want == 16 else name
        if want == 16 and name in fp16_copy:
            return fp16_copy[name]
        if name not in home:
            raise ValueError(f"fp16 variant: tensor {name!r} has no producer")
        if home[name] == want:
            return name
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}/as_fp{want}"
            src = name
            if want == 16:  # saturate instead of overflowing to inf
                src = f"{name}/clipped"
                nodes.append(helper.make_node("Clip", [name, clip_bound("fp16/min", -FP16_MAX),
                                                       clip_bound("fp16/max", FP16_MAX)], [src], name=f"fp16/{src}"))
            nodes.append(helper.make_node("Cast", [src], [casts[key]], name=f"fp16/{casts[key]}",
                                          to=FLOAT if want == 32 else FLOAT16))
        return casts[key]

    for node, p, want in zip(list(graph.node), precision, wants):
        if want:  # a node making constants: emitted in each precision its consumers want
            if want == {16, 32}:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"{node.name}/fp16"
                for idx, o in enumerate(node.output):
                    if elem.get(o) == FLOAT:
                        fp16_copy[o] = copy.output[idx] = f"{o}/fp16"
                _attributes_to_fp16(copy, FLOAT, FLOAT16, numpy_helper)
                nodes.extend([node, copy])
                continue
        for idx, name in enumerate(node.input):
            if name and elem.get(name) == FLOAT:
                node.input[idx] = convert(name, p)
        if p == 16:
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

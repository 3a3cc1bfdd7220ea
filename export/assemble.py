"""Splice pooling, Dense layers and normalization behind the traced transformer: one graph."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .._extras import require
from ..kernels.normalize import onnx_normalize
from ..kernels.onnx_graph import Subgraph
from ..kernels.pooling import onnx_pool
from .source import DenseSpec, Source

OUTPUT = "sentence_embedding"
# Extra graph input of models whose Pooling excludes the prompt (include_prompt=False): int64 [batch, seq],
# the attention mask with each row's prompt tokens cleared; the runtime fills it. Absent otherwise.
POOLING_MASK = "pooling_mask"


def load_dense_weights(spec: DenseSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Dense weights as numpy, from safetensors or (weights-only, never unpickling code) a torch file."""
    st_file = spec.path / "model.safetensors"
    if st_file.is_file():
        tensors = require("safetensors.numpy", "export").load_file(str(st_file))
    else:
        torch = require("torch", "export")
        tensors = {k: v.numpy() for k, v in torch.load(spec.path / "pytorch_model.bin", weights_only=True).items()}
    weight = tensors["linear.weight"].astype(np.float32)
    bias = tensors["linear.bias"].astype(np.float32) if spec.bias else None
    if weight.shape != (spec.out_features, spec.in_features):
        raise ValueError(f"{spec.path}: linear.weight has shape {weight.shape}, config says "
                         f"({spec.out_features}, {spec.in_features})")
    return weight, bias


def _dense(sub: Subgraph, x: str, spec: DenseSpec) -> str:
    # A plain MatMul: onnxruntime's CPU GEMM computes each row with the same K order whatever the row
    # count (measured for M = 1..67 and 1 or 2 threads; the stability tests recheck it end to end).
    weight, bias = load_dense_weights(spec)
    y = sub.op("MatMul", [x, sub.const(np.ascontiguousarray(weight.T), "dense_w")], "dense")
    if bias is not None:
        y = sub.op("Add", [y, sub.const(bias, "dense_b")], "dense_bias")
    if spec.activation == "tanh":
        y = sub.op("Tanh", [y])
    elif spec.activation == "relu":
        y = sub.op("Relu", [y])
    elif spec.activation == "sigmoid":
        y = sub.op("Sigmoid", [y])
    elif spec.activation == "gelu":
        erf = sub.op("Erf", [sub.op("Mul", [y, sub.const(np.float32(1 / np.sqrt(2)), "rsqrt2")])])
        y = sub.op("Mul", [sub.op("Mul", [y, sub.const(np.float32(0.5), "half")]),
                           sub.op("Add", [erf, sub.const(np.float32(1.0), "one")])], "gelu")
    return y


def assemble(transformer_onnx: Path, source: Source, out: Path) -> int:
    """Write the single-graph model; returns the embedding dimension."""
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper

    model = onnx.load(str(transformer_onnx))
    graph = model.graph
    sub = Subgraph("stableembed")
    pool_mask = None
    if not source.include_prompt:
        mask_input = next(i for i in graph.input if i.name == "attention_mask")
        extra = copy.deepcopy(mask_input)  # same int64 [batch, seq] type and dimension names
        extra.name = pool_mask = POOLING_MASK
        graph.input.append(extra)
    x = onnx_pool(sub, "token_embeddings", "attention_mask", source.pooling, source.max_length, pool_mask)
    dim = source.hidden_size * len(source.pooling)
    for spec in source.dense:
        if spec.in_features != dim:
            raise ValueError(f"Dense module {spec.path.name} expects {spec.in_features} inputs, pooling gives {dim}")
        x = _dense(sub, x, spec)
        dim = spec.out_features
    if source.normalize:
        x = onnx_normalize(sub, x, dim)
    sub.nodes.append(helper.make_node("Identity", [x], [OUTPUT], name=OUTPUT))
    graph.node.extend(sub.nodes)
    graph.initializer.extend(sub.initializers)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", dim]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return dim

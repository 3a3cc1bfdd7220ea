"""A minimal ONNX subgraph builder shared by the kernels.

Kernels append nodes to a `Subgraph` instead of building whole models, so the exporter can splice
them behind the transformer and the tests can wrap them alone in a model of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "stableembed.kernels' ONNX forms need the 'onnx' package: pip install 'stableembed[export]'"
    ) from exc


@dataclass
class Subgraph:
    """Nodes and constants under a common name prefix."""

    prefix: str = "se"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs: object) -> str:
        """Append one single-output node and return its output name."""
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray | float | int | Sequence[int], hint: str = "c") -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name


def standalone_model(
    sub: Subgraph,
    inputs: Sequence[tuple[str, int, Sequence[str | int | None]]],
    output: str,
    opset: int = 17,
) -> onnx.ModelProto:
    """Wrap a subgraph as a model whose single [batch, dim] output is `output` (used by the tests)."""
    graph = helper.make_graph(
        sub.nodes,
        "stableembed_kernel",
        [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "dim"])],
        initializer=sub.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model

"""L2 normalization of each row: NumPy reference and ONNX form.

Reduction order: the sum of squares over the embedding axis is `tree.tree_reduce` (adjacent pairs,
level by level, +0.0 padding at odd levels). The axis length is the model's fixed dimension, so the
order is the same for every row. Squares, sqrt, max and division are elementwise and correctly
rounded. Matches `torch.nn.functional.normalize(x, p=2, dim=1)` in meaning: x / max(||x||, 1e-12).
"""

from __future__ import annotations

import numpy as np

from .tree import onnx_tree_reduce, tree_reduce

NORM_EPS = 1e-12


def normalize_reference(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(tree_reduce(x * x, axis=1))[:, None]
    return x / np.maximum(norm, np.float32(NORM_EPS))


def onnx_normalize(sub, x: str, dim: int) -> str:
    """x: float32 [B, D] -> [B, D] unit rows."""
    sq = sub.op("Mul", [x, x], "sq")
    sq3 = sub.op("Unsqueeze", [sq, sub.const([2], "ax")], "sq3")  # [B, D, 1]: reduce axis 1
    ss = onnx_tree_reduce(sub, sq3, dim, static_length=True)  # [B, 1]
    norm = sub.op("Sqrt", [ss], "norm")
    norm = sub.op("Max", [norm, sub.const(np.float32(NORM_EPS), "eps")], "norm")
    return sub.op("Div", [x, norm], "normalized")

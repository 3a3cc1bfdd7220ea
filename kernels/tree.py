"""Pairwise tree reduction whose bits depend only on the values being reduced.

Reduction order (the definition of the bits): conceptually extend the reduced axis with identity
elements (+0.0 for sums) to infinity, then combine adjacent pairs, level by level:
    level 1: (x0 ∘ x1), (x2 ∘ x3), ...;  level 2: ((x0 ∘ x1) ∘ (x2 ∘ x3)), ...
until one element is left. Node j of level k covers elements [j·2^k, (j+1)·2^k), so the tree does not
change when the axis is longer because of trailing padding: a padded slot holds the identity and
`a ∘ identity == a` exactly. Each level is an elementwise operation on two slices, which every
execution provider computes exactly as IEEE-754 prescribes (no provider reorders a single add), so
the result cannot depend on batch size, batch position, thread count or provider.

The implementation pads an odd-length level with one identity element, which is the same tree.
"""

from __future__ import annotations

import math

import numpy as np

OPS = {"add": (np.add, 0.0), "max": (np.maximum, -np.inf)}  # (operation, identity element)


def tree_reduce(x: np.ndarray, axis: int, op: str = "add", identity: float | None = None) -> np.ndarray:
    """NumPy reference: reduce float32 `x` over `axis` with the adjacent-pair tree (axis removed)."""
    fn, default_identity = OPS[op]
    ident = np.float32(default_identity if identity is None else identity)
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0)
    if x.shape[0] == 0:
        return np.full(x.shape[1:], ident, dtype=np.float32)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = np.concatenate([x, np.full((1, *x.shape[1:]), ident, dtype=np.float32)])
        x = fn(x[0::2], x[1::2])
    return x[0]


def levels_for(max_length: int) -> int:
    """Tree depth that brings an axis of up to `max_length` elements down to one."""
    return max(1, math.ceil(math.log2(max(max_length, 1))))


def onnx_tree_reduce(sub, x: str, max_length: int, op: str = "add", identity: float | None = None) -> str:
    """ONNX form: reduce a float32 [B, L, C] tensor over axis 1 with the same tree; returns [B, C].

    The depth is fixed when the graph is built (enough for `max_length`); once a level holds one
    element, further levels add the identity to it, which changes no bit. An input longer than
    `max_length` leaves more than one element and the final Squeeze fails loudly.
    """
    onnx_op = {"add": "Add", "max": "Max"}[op]
    ident = OPS[op][1] if identity is None else identity
    ident_c = sub.const(np.array(ident, dtype=np.float32), "identity")
    two = sub.const(np.array([2], dtype=np.int64), "two")
    zeros4 = sub.const(np.zeros(4, dtype=np.int64), "zeros4")
    shape_tail = sub.const(np.array([0, -1, 2], dtype=np.int64), "shape_head")
    idx0 = sub.const(np.array(0, dtype=np.int64), "i0")
    idx1 = sub.const(np.array(1, dtype=np.int64), "i1")
    for _ in range(levels_for(max_length)):
        shape = sub.op("Shape", [x], "shape")
        length = sub.op("Slice", [shape, sub.const([1], "s"), sub.const([2], "e")], "len")
        odd = sub.op("Mod", [length, two], "odd")
        # pads = [0, 0, 0, 0, odd, 0]: one identity element at the end of axis 1 when odd
        pads = sub.op("Concat", [zeros4, odd, sub.const([0], "z")], "pads", axis=0)
        padded = sub.op("Pad", [x, pads, ident_c], "pad", mode="constant")
        channels = sub.op("Slice", [shape, sub.const([2], "s"), sub.const([3], "e")], "ch")
        new_shape = sub.op("Concat", [shape_tail, channels], "pairs_shape", axis=0)
        pairs = sub.op("Reshape", [padded, new_shape], "pairs")
        left = sub.op("Gather", [pairs, idx0], "left", axis=2)
        right = sub.op("Gather", [pairs, idx1], "right", axis=2)
        x = sub.op(onnx_op, [left, right], "level")
    return sub.op("Squeeze", [x, sub.const([1], "axis")], "reduced")

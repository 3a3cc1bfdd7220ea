"""Pairwise tree reduction whose bits depend only on the values being reduced.

Reduction order (the definition of the bits): conceptually extend the reduced axis with identity
elements (+0.0 for sums) to infinity, then combine adjacent pairs, level by level:
    level 1: (x0 ∘ x1), (x2 ∘ x3), ...;  level 2: ((x0 ∘ x1) ∘ (x2 ∘ x3)), ...
until one element is left; the ONNX form then runs the levels its `max_length` has left, each combining
that element with the identity (no change, except that for sums a -0.0 turns into +0.0: IEEE's
-0.0 + +0.0 is +0.0), and the reference does the same when given those levels. Node j of level k covers elements [j·2^k, (j+1)·2^k), so the tree does not
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


def tree_reduce(x: np.ndarray, axis: int, op: str = "add", identity: float | None = None,
                levels: int | None = None) -> np.ndarray:
    """NumPy reference: reduce float32 `x` over `axis` with the adjacent-pair tree (axis removed).
    `levels`: run exactly that many levels, as the ONNX form does (`levels_for(max_length)`); None: stop
    at one element. The two differ only where a sum is -0.0 (the extra levels make it +0.0)."""
    fn, default_identity = OPS[op]
    ident = np.float32(default_identity if identity is None else identity)
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0)
    if x.shape[0] == 0:
        x = np.full((1, *x.shape[1:]), ident, dtype=np.float32)
    if levels is not None and x.shape[0] > 2 ** levels:
        raise ValueError(f"{x.shape[0]} elements need more than {levels} levels")
    done = 0
    while x.shape[0] > 1 or (levels is not None and done < levels):
        if x.shape[0] % 2:
            x = np.concatenate([x, np.full((1, *x.shape[1:]), ident, dtype=np.float32)])
        x = fn(x[0::2], x[1::2])
        done += 1
    return x[0]


def levels_for(max_length: int) -> int:
    """Tree depth that brings an axis of up to `max_length` elements down to one."""
    return max(1, math.ceil(math.log2(max(max_length, 1))))


def onnx_tree_reduce(sub, x: str, max_length: int, op: str = "add", identity: float | None = None,
                     static_length: bool = False) -> str:
    """ONNX form: reduce a float32 [B, L, C] tensor over axis 1 with the same tree; returns [B, C].

    One level is four nodes with constant parameters, whatever L: append one identity element
    (Pad), take the even positions of all but that last slot (Slice 0:-1:2) and the odd positions
    (Slice 1::2), combine them. For even L the appended slot is never read; for odd L it is the right
    partner of the last element: exactly the reference's pairs. The depth is fixed when the graph is
    built (enough for `max_length`); once a level holds one element, further levels combine it with
    the identity, which changes no bit but the sign of a -0.0 sum (the reference's `levels`). An input longer than `max_length` leaves more than one element
    and the final Squeeze fails loudly.

    `static_length`: the axis always holds exactly `max_length` elements (an embedding's width), so each
    level's length is known and the Pad is left out of the levels whose length is even (same pairs).
    """
    onnx_op = {"add": "Add", "max": "Max"}[op]
    ident = OPS[op][1] if identity is None else identity
    ident_c = sub.const(np.array(ident, dtype=np.float32), "identity")
    one_more = sub.const(np.array([0, 0, 0, 0, 1, 0], dtype=np.int64), "pads")  # one slot at the end of axis 1
    axis = sub.const([1], "axis")
    step = sub.const([2], "step")
    even_start, even_end = sub.const([0], "s"), sub.const([-1], "e")
    odd_start, odd_end = sub.const([1], "s"), sub.const([np.iinfo(np.int64).max], "e")
    length = max_length
    for _ in range(levels_for(max_length)):
        if static_length and length % 2 == 0:  # known even length: the pairs are 0::2 and 1::2 as they stand
            left = sub.op("Slice", [x, even_start, odd_end, axis, step], "left")
        else:
            x = sub.op("Pad", [x, one_more, ident_c], "pad", mode="constant")
            left = sub.op("Slice", [x, even_start, even_end, axis, step], "left")
        right = sub.op("Slice", [x, odd_start, odd_end, axis, step], "right")
        x = sub.op(onnx_op, [left, right], "level")
        length = (length + 1) // 2
    return sub.op("Squeeze", [x, axis], "reduced")

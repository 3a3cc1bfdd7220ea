"""Masked pooling over the sequence axis: NumPy references and ONNX forms.

Reduction order: every sum over tokens is `tree.tree_reduce` (adjacent pairs, level by level) over
the token axis, with padded positions replaced by +0.0 (max: by -1e9, as sentence-transformers
does), so trailing padding of any length contributes identity elements only. The tree runs the depth of
the graph's max_length whatever the padded length (the reference takes that max_length: the depth turns
a -0.0 sum into +0.0). Token counts are sums of 0/1 values, exact in float32 in any order;
weightedmean's weight sum (up to T(T+1)/2, past float32's exact integers from 5,793 tokens) is summed
in int64, exact, and rounded to float32 once. Everything else is elementwise. The result for a row
therefore depends only on that row's real tokens: not on batch size, position, padding or threads.

Modes and their meaning follow sentence-transformers' `Pooling` module; several modes are
concatenated in the order the model's pooling config gives them, as sentence-transformers does.

A separate pooling mask (`pool_mask`) serves models whose Pooling has `include_prompt=False`: the
runtime clears a prompt's leading tokens in it, so they hold the identity like padding and drop out of
every sum, maximum and count, as sentence-transformers (6.2) clears its attention mask after the
transformer. With it, `cls` takes the first pooled token and `lasttoken` the last one, as
sentence-transformers' argmax / flip-argmax over the cleared mask do (a row with no pooled token, a
prompt that fills max_length: token 0, and for `lasttoken` that token times 0). Positions are small
integers, exact in float32, and ArgMax's choice does not depend on any order. Without a pooling
mask, the graph is what it always was.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .tree import levels_for, onnx_tree_reduce, tree_reduce

MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
MASKED_MAX = -1e9  # sentence-transformers' fill value for padded tokens in max pooling
COUNT_EPS = 1e-9  # sentence-transformers' clamp on the token count


def check_modes(modes: Sequence[str]) -> list[str]:
    """The modes, in their given order; ValueError for an unknown one or none."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown pooling mode(s) {bad or list(modes)}; known: {', '.join(MODES)}")
    return list(modes)


def pool_reference(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str],
                   pool_mask: np.ndarray | None = None, max_length: int | None = None) -> np.ndarray:
    """NumPy reference defining the exact bits. hidden: float32 [B, T, H]; mask: 0/1 [B, T] (real tokens);
    pool_mask: optional 0/1 [B, T], the tokens to pool (a subset of mask: prompt tokens cleared);
    max_length: the ONNX form's (it sets the sums' tree depth), default T."""
    hidden = np.asarray(hidden, dtype=np.float32)
    levels = levels_for(hidden.shape[1] if max_length is None else max_length)
    masked_prompt = pool_mask is not None
    mask = np.asarray(pool_mask if masked_prompt else mask)
    keep = (mask != 0)[:, :, None]
    count = mask.astype(np.float32).sum(axis=1, keepdims=True)  # integers: exact in any order
    outs = []
    rows = np.arange(hidden.shape[0])
    for mode in check_modes(modes):
        if mode == "cls":
            outs.append(hidden[rows, np.argmax(mask != 0, axis=1), :] if masked_prompt else hidden[:, 0, :])
        elif mode == "max":
            outs.append(tree_reduce(np.where(keep, hidden, np.float32(MASKED_MAX)), 1, "max", MASKED_MAX))
        elif mode in ("mean", "mean_sqrt_len"):
            total = tree_reduce(np.where(keep, hidden, np.float32(0.0)), 1, levels=levels)
            denom = np.maximum(count, np.float32(COUNT_EPS))
            outs.append(total / (denom if mode == "mean" else np.sqrt(denom)))
        elif mode == "weightedmean":
            w = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None]
            total = tree_reduce(np.where(keep, hidden * w, np.float32(0.0)), 1, levels=levels)
            # int64: exact for any length and order, then one rounding to float32 (summed in float32,
            # past 2^24 the total would round differently for different padded lengths)
            positions = np.arange(1, hidden.shape[1] + 1, dtype=np.int64)[None, :]
            wsum = ((mask != 0).astype(np.int64) * positions).sum(axis=1, keepdims=True).astype(np.float32)
            outs.append(total / np.maximum(wsum, np.float32(COUNT_EPS)))
        elif mode == "lasttoken":
            if masked_prompt:  # the last pooled position; 0 (and the value times 0) when none
                last = np.argmax((mask != 0) * np.arange(mask.shape[1], dtype=np.float32)[None, :], axis=1)
                outs.append(hidden[rows, last, :] * np.minimum(count, np.float32(1.0)))
                continue
            last = np.maximum(count.astype(np.int64)[:, 0] - 1, 0)
            outs.append(hidden[np.arange(hidden.shape[0]), last, :])
    return np.concatenate(outs, axis=1).astype(np.float32, copy=False)


def onnx_pool(sub, hidden: str, mask: str, modes: Sequence[str], max_length: int,
              pool_mask: str | None = None) -> str:
    """ONNX form of `pool_reference`: hidden float32 [B, T, H], mask int64 [B, T] -> [B, H·len(modes)];
    `pool_mask` (int64 [B, T]), when given, selects the pooled tokens instead of `mask`."""
    masked_prompt = pool_mask is not None
    mask = pool_mask if masked_prompt else mask
    keep = sub.op("Unsqueeze", [sub.op("Cast", [mask], "keep_b", to=9), sub.const([2], "ax")], "keep")
    maskf = sub.op("Cast", [mask], "mask_f", to=1)
    count = sub.op("ReduceSum", [maskf, sub.const([1], "ax")], "count", keepdims=1)
    eps = sub.const(np.float32(COUNT_EPS), "eps")
    zero = sub.const(np.float32(0.0), "zero")
    outs = []
    for mode in check_modes(modes):
        if mode == "cls":
            if masked_prompt:  # the first pooled token (ArgMax: the first maximum), 0 when none
                first = sub.op("ArgMax", [maskf], "first", axis=1, keepdims=1)
                outs.append(_gather_tokens(sub, hidden, first, "cls"))
            else:
                outs.append(sub.op("Gather", [hidden, sub.const(np.int64(0), "i0")], "cls", axis=1))
        elif mode == "max":
            fill = sub.const(np.float32(MASKED_MAX), "fill")
            masked = sub.op("Where", [keep, hidden, fill], "masked")
            outs.append(onnx_tree_reduce(sub, masked, max_length, "max", MASKED_MAX))
        elif mode in ("mean", "mean_sqrt_len"):
            masked = sub.op("Where", [keep, hidden, zero], "masked")
            total = onnx_tree_reduce(sub, masked, max_length)
            denom = sub.op("Max", [count, eps], "denom")
            if mode == "mean_sqrt_len":
                denom = sub.op("Sqrt", [denom], "sqrt_denom")
            outs.append(sub.op("Div", [total, denom], mode))
        elif mode == "weightedmean":
            shape = sub.op("Shape", [maskf], "mshape")
            length = sub.op("Gather", [shape, sub.const(np.int64(1), "i1")], "len")
            pos = sub.op("Range", [sub.const(np.int64(1), "one"), sub.op("Add", [length, sub.const(np.int64(1), "one")]),
                                   sub.const(np.int64(1), "one")], "pos")
            w = sub.op("Cast", [pos], "w", to=1)
            w3 = sub.op("Unsqueeze", [w, sub.const([0, 2], "ax")], "w3")
            weighted = sub.op("Mul", [hidden, w3], "weighted")
            masked = sub.op("Where", [keep, weighted, zero], "masked")
            total = onnx_tree_reduce(sub, masked, max_length)
            # int64 (exact for any length), then one Cast: the reference's rounding
            mask_i = sub.op("Cast", [sub.op("Cast", [mask], "keep_b1", to=9)], "mask_i", to=7)  # 0/1 as the reference
            wsum_i = sub.op("ReduceSum", [sub.op("Mul", [mask_i, pos]), sub.const([1], "ax")], "wsum_i", keepdims=1)
            wsum = sub.op("Cast", [wsum_i], "wsum", to=1)
            outs.append(sub.op("Div", [total, sub.op("Max", [wsum, eps])], mode))
        elif mode == "lasttoken":
            if masked_prompt:
                # ArgMax of mask * position: the last pooled token; a row with none gives 0, times 0 below
                shape = sub.op("Shape", [maskf], "mshape")
                length = sub.op("Gather", [shape, sub.const(np.int64(1), "i1")], "len")
                pos = sub.op("Cast", [sub.op("Range", [sub.const(np.int64(0), "zero_i"), length,
                                                       sub.const(np.int64(1), "one")], "pos")], "pos_f", to=1)
                last = sub.op("ArgMax", [sub.op("Mul", [maskf, pos], "mask_pos")], "last", axis=1, keepdims=1)
                got = _gather_tokens(sub, hidden, last, "last_token")
                any_ = sub.op("Min", [count, sub.const(np.float32(1.0), "one_f")], "any")  # 1.0 or 0.0: exact
                outs.append(sub.op("Mul", [got, any_], mode))
                continue
            last = sub.op("Sub", [sub.op("Cast", [count], "count_i", to=7), sub.const(np.int64(1), "one")], "last")
            last = sub.op("Max", [last, sub.const(np.int64(0), "zero_i")], "last")
            outs.append(_gather_tokens(sub, hidden, last, mode))
    return outs[0] if len(outs) == 1 else sub.op("Concat", outs, "pooled", axis=1)


def _gather_tokens(sub, hidden: str, index: str, hint: str) -> str:
    """hidden [B, T, H] at one token per row, index int64 [B, 1] -> [B, H]."""
    idx = sub.op("Unsqueeze", [index, sub.const([2], "ax")], "idx3")  # [B, 1, 1]
    shape = sub.op("Shape", [hidden], "hshape")
    hdim = sub.op("Slice", [shape, sub.const([2], "s"), sub.const([3], "e")], "h")
    b = sub.op("Slice", [shape, sub.const([0], "s"), sub.const([1], "e")], "b")
    full = sub.op("Concat", [b, sub.const([1], "one"), hdim], "idx_shape", axis=0)
    idx = sub.op("Expand", [idx, full], "idx")
    got = sub.op("GatherElements", [hidden, idx], "gathered", axis=1)
    return sub.op("Squeeze", [got, sub.const([1], "ax")], hint)

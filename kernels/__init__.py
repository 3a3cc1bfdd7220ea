"""Batch-invariant numerics: each kernel has a NumPy reference (the exact bits) and an ONNX form.

The NumPy references need only numpy; the ONNX forms (`onnx_*`) need the `onnx` package.
"""

from .normalize import normalize_reference
from .pooling import MODES as POOLING_MODES
from .pooling import pool_reference
from .tree import tree_reduce

__all__ = ["normalize_reference", "pool_reference", "tree_reduce", "POOLING_MODES"]

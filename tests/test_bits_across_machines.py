"""benchmarks/bits_across_machines.py's measures: ULP distance and the per-text comparison of two machines."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bits_across_machines as bits  # noqa: E402


def _next(x: float, toward: float) -> np.float32:
    return np.nextafter(np.float32(x), np.float32(toward))


def test_ulp_distance_counts_float32_steps_across_signs_and_zero() -> None:
    a = np.array([1.0, 0.0, -1.0, 2.0, -_next(0.0, 1.0)], np.float32)
    b = np.array([_next(1.0, 2.0), -0.0, _next(_next(-1.0, -2.0), -2.0), 2.0, _next(0.0, 1.0)], np.float32)
    # one step up; +0 and -0 coincide; two steps down; equal; the smallest negative to the smallest positive
    assert bits.ulp_distance(a, b).tolist() == [1, 0, 2, 0, 2]


def test_compare_counts_identical_texts_and_reports_the_worst_component() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 8)).astype(np.float32)
    b = a.copy()
    b[1, 3] = _next(b[1, 3], np.inf)
    b[4, 0] = -b[4, 0]
    figs = bits.compare(a, b)
    assert figs["texts"] == 5 and figs["identical"] == 3 and figs["components_differing"] == 2
    assert figs["max_abs"] == 2 * abs(float(a[4, 0]))
    assert figs["min_cosine"] < 1.0
    same = bits.compare(a, a.copy())
    assert same["identical"] == 5 and same["max_ulp"] == 0 and same["max_abs"] == 0.0

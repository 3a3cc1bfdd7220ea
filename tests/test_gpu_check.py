"""Smoke test of benchmarks/gpu_check.py on the CPU provider (--quick): every step of the GPU check runs
end to end and writes the fields issue 10 asks of gpu.json, with figures that are measured, not set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_measured_figures(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--provider", "cpu", "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.startswith("device: ") and "provider cpu" in res.stdout.splitlines()[0]
    r = json.loads(out.read_text(encoding="utf-8"))
    for key in ("device", "driver", "onnxruntime", "date", "texts", "parity_fp32", "fixed_mode", "dynamic_mode",
                "fp16", "trt_prepared", "throughput", "latency_ms"):
        assert key in r, key
    n = r["texts_short"] + r["texts_long"]
    assert r["texts"] == n and r["texts_long"] > 0 and r["provider"] == "cpu"
    # On the CPU provider the guarantee holds: every text bit-identical in every arrangement, fixed mode
    # and the CPU reference (dynamic) the same bits, in fp32 and in the fp16 graph.
    for key in ("fixed_mode", "dynamic_mode", "fp16"):
        assert r[key]["total"] == n and r[key]["identical"] == n, (key, r[key])
        assert set(r[key]["per_arrangement"].values()) == {n}
    assert r["fixed_mode"]["batch_matches_alone"] == n
    assert r["parity_fp32"]["max_abs"] == 0.0 and r["parity_fp32"]["min_cos"] > 1 - 1e-9
    # Measured, not constants: the fp16 graph differs from fp32 (a little), as the TensorRT-prepared one may.
    assert 0.0 < r["fp16"]["max_abs"] < 2e-3 and 0.999 <= r["fp16"]["min_cos"] < 1.0
    assert r["trt_prepared"]["max_abs"] < 1e-5 and r["trt_prepared"]["min_cos"] > 0.99999
    assert r["parity_st_fp32"]["min_cos"] > 0.99999  # same seeded weights in sentence-transformers
    engines = {(t["engine"], t["precision"], t["workload"]) for t in r["throughput"]}
    for precision in ("fp32", "fp16"):
        for workload in ("short", "long"):
            assert ("stableembed-dynamic", precision, workload) in engines
            assert ("stableembed-fixed", precision, workload) in engines
    assert ("st-torch", "fp32", "short") in engines
    assert all(t["texts_per_s"] > 0 and t["seconds"] > 0 for t in r["throughput"])
    assert {lat["engine"] for lat in r["latency_ms"]} == {"stableembed-dynamic", "stableembed-fixed", "st-torch"}
    assert all(0 < lat["p50"] <= lat["p99"] for lat in r["latency_ms"])

"""How fast onnxruntime's CPU MatMul runs on the transformer's own GEMM shapes, against the SGEMM limit.

    .venv/bin/python benchmarks/gemm_ceiling.py [--threads 2] [--tokens 512,2048] [--repeats 30]

The "% of SGEMM" figures of benchmarks/run.py divide a workload's useful FLOPs by a 4096² float32 SGEMM
(numpy's BLAS). The transformer's MatMuls are much smaller (all-MiniLM-L6-v2: [M, 384] × [384, 384] four
times a layer, [M, 384] × [384, 1536] and [M, 1536] × [1536, 384], M = the tokens of one batch) and run
in onnxruntime's own GEMM (MLAS), not in that BLAS. This script times one MatMul node per shape in
onnxruntime (a session per shape, each timed alone: medians of --repeats runs after warm-up), the same
product in numpy, and the 4096² SGEMM, all in this process with --threads threads. The FLOP-weighted mix
of the six linear layers is the speed the model's linear layers could reach if nothing else ran; no
engine built on onnxruntime's MatMul reaches a higher fraction of the SGEMM limit on this machine.

For a few tokens (M = 16: one short text) a MatMul reads far more weight bytes than it does FLOPs, so its
limit is memory bandwidth, not the SGEMM limit. The script also measures that bandwidth as BLAS sees it
(float32 matrix-vector products over a 256 MiB matrix, which streams every byte once per product) and gives,
per token count, one layer's linear MatMul time in onnxruntime beside the time to read its weights once at
that bandwidth.
Writes benchmarks/results/<machine key>/gemm_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

import numpy as np

from machine import announce, machine, save

H, I = 384, 1536  # all-MiniLM-L6-v2: hidden size and FFN width
LAYER = (("query/key/value/output", H, H, 4), ("FFN up", H, I, 1), ("FFN down", I, H, 1))


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_matmul_gflops(m: int, k: int, n: int, threads: int, repeats: int) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    seconds = median_seconds(lambda: sess.run(None, {"x": x}), 5, repeats)
    del sess
    return 2.0 * m * k * n / seconds / 1e9


def numpy_gflops(m: int, k: int, n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    return 2.0 * m * k * n / median_seconds(lambda: a @ b, 3, repeats) / 1e9


def stream_gbps(repeats: int) -> float:
    """Weight-streaming bandwidth: a [8192, 8192] float32 matrix (256 MiB, beyond any cache) times a
    vector, GB/s of matrix bytes read, median of `repeats`."""
    rng = np.random.default_rng(0)
    a, v = rng.standard_normal((8192, 8192), dtype=np.float32), rng.standard_normal(8192, dtype=np.float32)
    return a.nbytes / median_seconds(lambda: a @ v, 2, repeats) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="16,512,2048", help="M: tokens in one batch (comma-separated)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    m_info = machine()
    announce(m_info)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        limit = max(numpy_gflops(4096, 4096, 4096, 5) for _ in range(2))
        bandwidth = stream_gbps(max(5, args.repeats // 3))
        rows = [{"tokens": m, "layer": name, "k": k, "n": n, "per_layer": count,
                 "numpy_gflops": numpy_gflops(m, k, n, args.repeats)}
                for m in (int(t) for t in args.tokens.split(",")) for name, k, n, count in LAYER]
    # onnxruntime last, after a pause: OpenBLAS's worker threads spin for a while after each numpy call
    # and would take a core from onnxruntime (interleaving the two measured some shapes at half speed).
    time.sleep(2.0)
    for r in rows:
        r["ort_gflops"] = ort_matmul_gflops(r["tokens"], r["k"], r["n"], args.threads, args.repeats)
    mixes, layer_ms = {}, {}
    weight_bytes = 4 * sum(k * n * count for _, k, n, count in LAYER)  # one layer's linear weights, float32
    for m in sorted({r["tokens"] for r in rows}):
        rs = [r for r in rows if r["tokens"] == m]
        flops = [2.0 * m * r["k"] * r["n"] * r["per_layer"] for r in rs]
        seconds = sum(f / (r["ort_gflops"] * 1e9) for f, r in zip(flops, rs))
        mixes[m] = sum(flops) / seconds / 1e9
        layer_ms[m] = 1e3 * seconds
    read_ms = 1e3 * weight_bytes / (bandwidth * 1e9)
    lines = [f"# onnxruntime MatMul on all-MiniLM-L6-v2's shapes vs the SGEMM limit ({args.threads} threads)", "",
             f"SGEMM limit: numpy float32 4096² with {args.threads} BLAS threads: **{limit:.1f} GFLOP/s**. "
             f"Each shape: one MatMul node, median of {args.repeats} runs.", "",
             "| tokens M | layer | shape | onnxruntime GFLOP/s | % of limit | numpy GFLOP/s |", "|--:|---|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['layer']} (×{r['per_layer']}) | [{r['tokens']}, {r['k']}] × [{r['k']}, "
                     f"{r['n']}] | {r['ort_gflops']:.1f} | {100 * r['ort_gflops'] / limit:.1f}% | "
                     f"{r['numpy_gflops']:.1f} |")
    lines += ["", "FLOP-weighted mix of one layer's six linear MatMuls in onnxruntime (the ceiling for an "
              "onnxruntime engine's useful FLOPs, before attention, softmax, LayerNorm and GELU): " +
              "; ".join(f"M = {m}: {g:.1f} GFLOP/s = **{100 * g / limit:.1f}%** of the limit" for m, g in mixes.items()),
              "", f"Weight-streaming bandwidth (float32 matrix-vector over 256 MiB, {args.threads} BLAS threads): "
              f"**{bandwidth:.1f} GB/s**. One layer's linear weights are {weight_bytes / 1e6:.2f} MB; reading "
              f"them once at that bandwidth takes **{read_ms:.3f} ms** (× 6 layers = {6 * read_ms:.2f} ms a model "
              "run, whatever the engine, unless they stay in cache).", "",
              "| tokens M | one layer's linear MatMuls in onnxruntime (ms) | weight read at stream bandwidth (ms) | "
              "ratio |", "|--:|--:|--:|--:|"]
    lines += [f"| {m} | {ms:.3f} | {read_ms:.3f} | {ms / read_ms:.2f}× |" for m, ms in layer_ms.items()]
    data = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
            "sgemm_limit_gflops": limit, "stream_gbps": bandwidth, "layer_weight_bytes": weight_bytes,
            "rows": rows, "linear_mix_gflops": {str(k): v for k, v in mixes.items()},
            "layer_linear_ms": {str(k): v for k, v in layer_ms.items()}, "weight_read_ms": read_ms}
    print(save("gemm_ceiling", m_info, data, "\n".join(lines), out=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

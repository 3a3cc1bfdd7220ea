"""A second graph for onnxruntime's CPU provider: the same model with onnxruntime's fused transformer
operators (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu).

Why a second graph: a single text on 2 cores ran 18% faster through it (6.09 ms against 7.42, p50, README
Performance), since it has less than half the nodes; TensorRT and CUDA keep parsing the standard-op
model.onnx, which stays in the artifact unchanged.

Why its bits can be promised: every fused kernel computes a (text, head) pair or a token row on its own,
with a reduction order fixed by the row's position in the tensor, and padded key positions add exact
zeros to the softmax sums in the lanes they occupy. That is a claim about onnxruntime's code, so the
export checks it (`_check`): each of the bundled sample texts alone against the same texts in one padded
batch, bit for bit, and the graph against model.onnx within FUSED_TOLERANCE. A graph that fails either
check, or whose fusion is incomplete (any layer left unfused), is not written and the manifest says why;
the CPU provider then runs model.onnx. The Encoder-level stability tests run through this graph.

Weights are shared: an initializer whose bytes model.onnx.data already holds is pointed at the same
offset there; only what fusion made new (the concatenated Q, K, V weights and biases: about 11 MB for
all-MiniLM-L6-v2) goes to model.cpu.onnx.data.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from .._extras import require
from ..runtime.manifest import CPU_MODEL, CPU_WEIGHTS, MODEL, WEIGHTS
from .artifact import ALIGNMENT, EXTERNAL_MIN_BYTES, required_version, write_manifest

# Families whose encoder layers the optimizer's "bert" fusions recognise (post-LayerNorm BERT blocks; each
# measured on a tiny model). Others are not tried: MPNet's relative position bias leaves its attention
# unfused, and rotary, pre-norm and decoder layers need other fusions.
FUSED_FAMILIES = {"BERT": "bert", "RoBERTa": "bert", "XLM-RoBERTa": "bert", "ELECTRA": "bert", "DistilBERT": "bert"}
# The fused graph against model.onnx, on the sample: |difference| <= ATOL + RTOL * |model.onnx's value|.
# all-MiniLM-L6-v2 measured 2.2e-7 (normalized embeddings); the kernels sum in another order, no more.
FUSED_TOLERANCE = (1e-5, 1e-4)  # (atol, rtol)


def _expected_operators(layers: int) -> dict[str, int]:
    # per layer one attention, two residual LayerNorms, one GELU with its bias. The embeddings' LayerNorm is
    # fused where the optimizer recognises the embeddings (BERT, ELECTRA, DistilBERT: 1) and stays a plain
    # LayerNormalization where it does not (RoBERTa's position ids counted from the padding id: 0).
    return {"Attention": layers, "SkipLayerNormalization": 2 * layers, "BiasGelu": layers}


def _shared_offsets(folder: Path) -> dict[str, tuple[int, int]]:
    """sha256 of each tensor stored in model.onnx.data -> (offset, length)."""
    onnx = require("onnx", "export")

    model = onnx.load(str(folder / MODEL), load_external_data=False)
    out: dict[str, tuple[int, int]] = {}
    with open(folder / WEIGHTS, "rb") as data:
        for t in model.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if "location" not in info:
                continue
            offset, length = int(info.get("offset", 0)), int(info["length"])
            data.seek(offset)
            out.setdefault(hashlib.sha256(data.read(length)).hexdigest(), (offset, length))
    return out


def fuse_transformer(traced: Path, out: Path, family: str, heads: int, hidden: int, layers: int) -> dict:
    """Fuse the traced transformer graph `traced` (before pooling and the head are spliced on: the
    optimizer's symbolic shape inference takes minutes over the pooling trees' Slices) into `out`.
    Returns the partial `cpu_graph` record, or {"file": None, "reason": ...} where the fusion is incomplete."""
    if family not in FUSED_FAMILIES:
        return {"file": None, "reason": f"no fused operators for the {family} family"}
    onnx = require("onnx", "export")
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    model_type = FUSED_FAMILIES[family]
    # opt_level 0: the Python fusions only; onnxruntime's own graph optimizations run at load, as for model.onnx
    fused = optimizer.optimize_model(onnx.load(str(traced)), model_type=model_type, num_heads=heads,
                                     hidden_size=hidden, optimization_options=FusionOptions(model_type),
                                     opt_level=0, use_gpu=False)
    counts: dict[str, int] = {}
    for node in fused.model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    expected = _expected_operators(layers)
    got = {op: counts.get(op, 0) for op in expected}
    if got != expected:
        return {"file": None, "reason": f"incomplete fusion: {got}, expected {expected}"}
    got = {"EmbedLayerNormalization": counts.get("EmbedLayerNormalization", 0), **got}
    if not any(o.domain == "com.microsoft" for o in fused.model.opset_import):
        fused.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the contrib operators' domain
    onnx.save(fused.model, str(out))
    return {"file": CPU_MODEL, "operators": got, "providers": ["cpu"],
            "fused_by": f"onnxruntime.transformers.optimizer {metadata.version('onnxruntime')} "
                        f"(model_type {model_type}, opt_level 0)"}


def store_and_check(folder: Path, manifest: dict, record: dict) -> dict:
    """Store the weights of `folder`/model.cpu.onnx (self-contained, written by assemble) externally: every
    tensor whose bytes model.onnx.data holds points there; the rest go to model.cpu.onnx.data. Then check
    the graph (`_check`); returns the final `cpu_graph` record (the files are removed if the check fails)."""
    onnx = require("onnx", "export")
    from onnx.external_data_helper import set_external_data

    path, data_file = folder / CPU_MODEL, folder / CPU_WEIGHTS
    model = onnx.load(str(path))
    shared = _shared_offsets(folder)
    data_file.unlink(missing_ok=True)
    offset = own = reused = 0
    for t in model.graph.initializer:
        n = len(t.raw_data) if t.HasField("raw_data") else 0
        if n < EXTERNAL_MIN_BYTES:
            continue
        hit = shared.get(hashlib.sha256(t.raw_data).hexdigest())
        if hit is not None and hit[1] == n:
            set_external_data(t, WEIGHTS, offset=hit[0], length=n)
            t.ClearField("raw_data")  # onnx.save_model writes only tensors that still hold their bytes
            reused += 1
            continue
        aligned = -(-offset // ALIGNMENT) * ALIGNMENT
        set_external_data(t, CPU_WEIGHTS, offset=aligned, length=n)
        offset, own = aligned + n, own + 1
    onnx.save_model(model, str(path))
    if own:
        data_file.chmod((folder / MODEL).stat().st_mode & 0o777)
    record = {**record, "weights": {"shared": {"file": WEIGHTS, "tensors": reused},
                                    "own": {"file": CPU_WEIGHTS if own else None, "tensors": own, "bytes": offset}}}
    problem = _check(folder, manifest, record)
    if problem:
        path.unlink()
        data_file.unlink(missing_ok=True)
        return {"file": None, "reason": problem, "check": record["check"]}
    return record


def _check(folder: Path, manifest: dict, record: dict) -> str | None:
    """None if the fused graph gives each sample text the same bits alone and in a padded batch, and
    stays within FUSED_TOLERANCE of model.onnx; otherwise what failed. Records the figures in `record`."""
    import onnxruntime as ort

    from ..data import sample_texts
    from ..runtime.backends.onnxruntime import CPU_EP, session_options
    from ..runtime.manifest import load_manifest
    from ..runtime.schedule import Batch
    from ..runtime.tokenize import TextTokenizer

    # The runtime's own tokenization and feeds (lowercasing, truncation, masks, token types), so the check
    # runs exactly what an Encoder would; the manifest is written first so the runtime can read it.
    write_manifest(folder, manifest)
    tok = TextTokenizer(load_manifest(folder, check_hashes=False))
    encs = tok.encode(sample_texts())
    rows = len(encs)
    feeds = tok.feeds(encs, Batch(tuple(range(rows)), max(len(e.ids) for e in encs), rows))
    out = manifest["output"]

    def session(name: str):
        return ort.InferenceSession(str(folder / name), session_options(2), providers=[CPU_EP])

    standard = session(MODEL).run([out], feeds)[0]
    fused_session = session(CPU_MODEL)
    batched = fused_session.run([out], feeds)[0]
    alone = np.stack([fused_session.run([out], tok.feeds(encs, Batch((row,), len(encs[row].ids), 1)))[0][0]
                      for row in range(rows)])
    identical = int((batched.view(np.uint32) == alone.view(np.uint32)).all(axis=1).sum())
    atol, rtol = FUSED_TOLERANCE
    diff = float(np.abs(batched - standard).max())
    record["check"] = {"texts": rows, "alone_vs_batched_bit_identical": identical,
                       "max_abs_diff_to_model_onnx": diff, "tolerance": {"atol": atol, "rtol": rtol}}
    if identical != rows:
        return f"fused graph not batch-invariant: {rows - identical} of {rows} sample texts differ"
    if not np.allclose(batched, standard, atol=atol, rtol=rtol):
        return f"fused graph differs from model.onnx by up to {diff:.3g} (tolerance atol {atol}, rtol {rtol})"
    return None


def drop_cpu_graph(folder: Path, manifest: dict, reason: str) -> None:
    """Remove the CPU graph from the artifact `folder` whose model.onnx was replaced (an fp16 copy, say): the
    fused graph would no longer be the same model. Edits `manifest` (the caller re-writes it with
    export.artifact.write_manifest); the CPU provider then runs model.onnx."""
    for name in (CPU_MODEL, CPU_WEIGHTS):
        (folder / name).unlink(missing_ok=True)
        manifest.get("files", {}).pop(name, None)
    manifest["cpu_graph"] = {"file": None, "reason": reason}
    manifest["format_version"] = required_version(manifest)

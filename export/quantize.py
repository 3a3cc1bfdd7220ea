"""int8 rewrite of an assembled fp32 model.onnx whose bits stay batch-invariant.

onnxruntime's stock dynamic quantization (DynamicQuantizeLinear) takes one activation scale over the
whole batch tensor, padding included, so a text's embedding depends on its companions. Here every
quantity that defines a row's bits depends on that row alone (see `kernels/quant.py` for the exact
definition and its NumPy reference):

- each MatMul with a constant weight [K, N] -> int8 weights per output channel + activations quantized
  per row (per token) -> com.microsoft MatMulIntegerToFloat (MLAS QGEMM: exact integer sums) -> one Mul
  by the row's scale; the graph's bias Add follows;
- each embedding table (Gather from a constant [V, H]) -> int8 per row + one float32 scale per row;
- everything else (attention score/context MatMuls, softmax, LayerNorm, GELU, pooling, Dense layers,
  normalization) stays float32 and unchanged: the pooling and normalization are our tree kernels.

Constants that only shape the quantization (never the batch invariance) are calibrated on a few texts
run through the fp32 model (`calibrate`):
- one-sided activations (calibrated min >= -5% of max: GELU outputs) get a fixed offset and 0..255;
- two-sided ones get SmoothQuant factors (x * m per channel, W's rows / m) where that cuts the layer's
  output error on the calibration rows by 10% or more, with the strength (alpha) that cuts it most;
- the bias absorbs the offset's share and mean(x) @ (W - W_int8), the weights' mean rounding error.
Measured on all-MiniLM-L6-v2 (tuning split, benchmarks/int8_quality.py): 8-bit weights under the pair
limit instead of 7-bit ones, smoothing, and the one-sided GELU outputs took the mean cosine to
sentence-transformers from 0.9964 to 0.9991 and the top-10 overlap from 0.93 to 0.96; no layer needed
to stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._extras import require
from ..kernels import quant
from ..kernels.onnx_graph import Subgraph

HEAD_PREFIX = "stableembed/"  # nodes assemble() appended (pooling, Dense, normalization): never quantized
ONE_SIDED = 0.05  # an activation with calibrated min >= -ONE_SIDED * max is quantized one-sided (offset)
SAMPLE_ROWS = 2048  # calibration rows kept per activation to measure each choice's output error
SMOOTH_GAIN = 0.9  # smooth only where it cuts the layer's output error below this fraction (it costs a Mul)


@dataclass
class QuantOptions:
    """Choices measured on all-MiniLM-L6-v2 (benchmarks/int8_quality.py; tuning split)."""

    kernel: str = "u8s8"  # "u8s8": int8 weights, rows paired under the int16 limit; "u8u8": uint8 weights
    smooth_alphas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)  # SmoothQuant strengths tried per activation
    smooth: tuple[str, ...] = ("",)  # smooth activations feeding MatMuls whose name contains one of these
    one_sided: bool = True  # offset quantization of activations bounded below (GELU outputs)
    tables: bool = True  # int8 embedding tables
    keep_fp32: tuple[str, ...] = ()  # MatMuls (name substring) left float32
    act_form: str = "axis"  # kernels.quant.onnx_quantize_rows form: "axis" or "div"
    bias_correct: bool = True  # fold mean(x) @ (W - W_int8) into the bias (calibration means)


@dataclass
class QuantReport:
    """What the rewrite did: recorded in the manifest."""

    options: QuantOptions
    quantized: list[str] = field(default_factory=list)  # MatMul nodes now int8
    kept_fp32: list[str] = field(default_factory=list)  # MatMul nodes with a constant weight left float32
    tables: list[str] = field(default_factory=list)  # embedding tables now int8 per row
    activations: dict = field(default_factory=dict)  # activation -> choice and calibration error
    smoothed: int = 0
    one_sided: int = 0
    calibration_tokens: int = 0

    def as_manifest(self) -> dict:
        o = self.options
        return {
            "scheme": "weights int8 per output channel; activations uint8 per row (token): symmetric "
                      "(max|x|/127, zero point 128) or one-sided (max(x+offset)/255); exact int32 sums; "
                      "y = (float(acc) * w_scale) * row_scale; embedding tables int8 per row",
            "operator": "com.microsoft.MatMulIntegerToFloat (onnxruntime MLAS QGEMM, "
                        + ("uint8 x int8" if o.kernel == "u8s8" else "uint8 x uint8") + ")",
            "kernel": o.kernel,
            "activation_form": o.act_form,
            "float32": "attention scores and context (activation x activation MatMuls), softmax, LayerNorm, "
                       "GELU, residual adds, pooling, Dense layers, normalization",
            "quantized_matmuls": len(self.quantized),
            "kept_fp32": self.kept_fp32,
            "quantized_tables": self.tables,
            "activations": self.activations,
            "smoothed_activations": self.smoothed,
            "one_sided_activations": self.one_sided,
            "calibration_tokens": self.calibration_tokens,
            "bias_correction": o.bias_correct,
        }


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def calibrate(model_bytes: bytes, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Run the fp32 model; per activation, over real tokens: per-channel max |x|, min and sum, the overall
    min and max, the row count, and a sample of rows."""
    onnx = require("onnx", "export")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load_from_string(model_bytes)
    for n in names:
        model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    stats: dict[str, dict] = {}
    for feed in feeds:
        outs = sess.run(list(names), dict(feed))
        mask = np.asarray(feed["attention_mask"]) != 0
        for n, x in zip(names, outs):
            rows = x[mask] if x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            st = stats.setdefault(n, {"absmax": np.zeros(x.shape[-1]), "chmin": np.full(x.shape[-1], np.inf),
                                      "min": np.inf, "max": -np.inf, "rows": 0})
            st["absmax"] = np.maximum(st["absmax"], np.abs(rows).max(axis=0))
            st["chmin"] = np.minimum(st["chmin"], rows.min(axis=0))
            st["sum"] = st.get("sum", 0.0) + rows.astype(np.float64).sum(axis=0)
            st["min"] = min(st["min"], float(rows.min()))
            st["max"] = max(st["max"], float(rows.max()))
            st["rows"] += len(rows)
            st.setdefault("sample", []).append(rows[:: max(1, len(rows) // 256)])
    for st in stats.values():
        sample = np.concatenate(st.pop("sample"))
        st["sample"] = sample[:: max(1, len(sample) // SAMPLE_ROWS)]
    return stats


def _smooth_factors(st: dict, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant: m[k] = max|x_k|^alpha / max|W[k, :]|^(1 - alpha); x is multiplied by 1 / m."""
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    xmax = st["absmax"].astype(np.float64)
    m = np.where((xmax > 0) & (wmax > 0), xmax ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
    return (1.0 / np.clip(m, 1e-4, 1e4)).astype(np.float32)


def output_error(x: np.ndarray, weights: list[np.ndarray], spec: quant.ActSpec, kernel: str,
                 refs: list[np.ndarray] | None = None) -> float:
    """Relative squared error of the quantized layers' outputs against float32 on the rows `x`
    (computed in float32: an estimate to rank choices, not the bits)."""
    u, s = quant.quantize_rows(x, spec)
    xq = (u.astype(np.float32) - np.float32(spec.zero_point)) * s
    num = den = 0.0
    for i, w in enumerate(weights):
        wq, c, corr = quant.prepare_weight(w, spec, kernel)
        ref = refs[i] if refs is not None else x @ w
        diff = xq @ (wq.astype(np.float32) * c) + corr - ref
        num += float(np.square(diff, dtype=np.float64).sum())
        den += float(np.square(ref, dtype=np.float64).sum())
    return num / max(den, 1e-30)


def _act_spec(st: dict, weights: list[np.ndarray], opts: QuantOptions, smooth: bool) -> tuple[quant.ActSpec, dict]:
    """The activation's quantization and the calibration errors behind the choice."""
    x = st["sample"].astype(np.float32)
    refs = [x @ w for w in weights]
    if opts.one_sided and st["max"] > 0 and st["min"] >= -ONE_SIDED * st["max"]:
        spec = quant.ActSpec(offset=float(np.float32(max(-st["min"], 0.0))))
        return spec, {"choice": "one-sided", "error": output_error(x, weights, spec, opts.kernel, refs)}
    base = output_error(x, weights, quant.SYMMETRIC, opts.kernel, refs)
    best, best_err, best_alpha = quant.SYMMETRIC, base, None
    if smooth:
        for alpha in opts.smooth_alphas:
            spec = quant.ActSpec(smooth=_smooth_factors(st, weights, alpha))
            err = output_error(x, weights, spec, opts.kernel, refs)
            if err < best_err:
                best, best_err, best_alpha = spec, err, alpha
        if best_err > SMOOTH_GAIN * base:
            best, best_err, best_alpha = quant.SYMMETRIC, base, None
    return best, {"choice": "symmetric" if best_alpha is None else f"smooth {best_alpha}", "error": best_err,
                  "error_unsmoothed": base}


def quantize_model(fp32_onnx: Path, out: Path, calibration: Sequence[Mapping[str, np.ndarray]] = (),
                   options: QuantOptions | None = None) -> QuantReport:
    """Rewrite `fp32_onnx` into the int8 model `out` (may be the same path).

    `calibration`: feeds (input_ids, attention_mask, ...) run through the fp32 model to set smoothing
    factors and offsets; without it, every activation is quantized symmetric and unsmoothed.
    """
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper, numpy_helper

    opts = options or QuantOptions()
    if opts.kernel not in ("u8s8", "u8u8"):
        raise ValueError(f"kernel must be 'u8s8' or 'u8u8', got {opts.kernel!r}")
    model = onnx.load(str(fp32_onnx))
    graph = model.graph
    opset = _opset(model)
    inits = {t.name: t for t in graph.initializer}
    report = QuantReport(options=opts)

    def const_float(name: str, rank: int) -> np.ndarray | None:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != rank:
            return None
        return numpy_helper.to_array(t)

    targets = []  # MatMul nodes to quantize
    for node in graph.node:
        if node.op_type == "MatMul" and const_float(node.input[1], 2) is not None:
            if node.name.startswith(HEAD_PREFIX) or any(k in node.name for k in opts.keep_fp32):
                report.kept_fp32.append(node.name)
            else:
                targets.append(node)
    groups: dict[str, list] = {}
    for node in targets:
        groups.setdefault(node.input[0], []).append(node)
    stats = calibrate(model.SerializeToString(), list(groups), calibration) if calibration else {}
    specs: dict[str, quant.ActSpec] = {}
    for x, nodes in groups.items():
        if x in stats:
            smooth = any(any(k in n.name for k in opts.smooth) for n in nodes)
            specs[x], report.activations[x] = _act_spec(stats[x], [const_float(n.input[1], 2) for n in nodes],
                                                        opts, smooth)
            report.calibration_tokens = max(report.calibration_tokens, stats[x]["rows"])
        else:
            specs[x] = quant.SYMMETRIC
        report.smoothed += specs[x].smooth is not None
        report.one_sided += specs[x].offset is not None

    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    target_outputs = {n.output[0] for n in targets}  # by output (unique in a graph): names may be empty
    sub = Subgraph("int8")
    act_q: dict[str, tuple[str, str]] = {}  # activation -> (uint8, scale): shared by Q, K, V
    new_nodes = []
    for node in graph.node:
        start = len(sub.nodes)
        replaced = False
        if node.op_type == "MatMul" and node.output[0] in target_outputs:
            spec = specs[node.input[0]]
            w = const_float(node.input[1], 2)
            wq, c, corr = quant.prepare_weight(w, spec, opts.kernel)
            st = stats.get(node.input[0])
            if opts.bias_correct and st is not None:
                w_eff = wq.astype(np.float64) * c
                if spec.smooth is not None:
                    w_eff = w_eff * spec.smooth.astype(np.float64)[:, None]
                corr = (corr + (st["sum"] / st["rows"]) @ (w.astype(np.float64) - w_eff)).astype(np.float32)
            if node.input[0] not in act_q:
                act_q[node.input[0]] = quant.onnx_quantize_rows(sub, node.input[0], opset, spec, opts.act_form)
            u, s = act_q[node.input[0]]
            quant.onnx_qmatmul(sub, u, s, wq, c, spec, opts.kernel)
            if corr.any():
                _add_bias_correction(sub, node.output[0], corr, consumers, const_float,
                                     required=spec.offset is not None)
            sub.nodes[-1].output[0] = node.output[0]
            report.quantized.append(node.name)
            replaced = True
        elif opts.tables and node.op_type == "Gather" and not node.name.startswith(HEAD_PREFIX):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            table = const_float(node.input[0], 2)
            if table is not None and axis == 0:
                quant.onnx_gather(sub, node.input[1], *quant.quantize_table(table))
                sub.nodes[-1].output[0] = node.output[0]
                report.tables.append(node.input[0])
                replaced = True
        new_nodes.extend(sub.nodes[start:])
        if not replaced:
            new_nodes.append(node)

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(sub.initializers)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == quant.MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(quant.MS_DOMAIN, 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return report


def _add_bias_correction(sub, out: str, corr: np.ndarray, consumers, const_float, required: bool) -> None:
    """Fold `corr` into the bias Add that alone consumes the MatMul output `out`; when there is none, add
    an Add node if the correction is `required` (one-sided activations), else drop it (it is optional)."""
    users = consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = 1 if add.input[0] == out else 0
        bias = const_float(add.input[other], 1)
        if bias is not None and bias.shape == corr.shape and len(consumers.get(add.input[other], [])) == 1:
            add.input[other] = sub.const((bias.astype(np.float64) + corr).astype(np.float32), "bias_corrected")
            return
    if required:
        sub.nodes[-1].output[0] = sub.name("uncorrected")
        sub.op("Add", [sub.nodes[-1].output[0], sub.const(corr, "bias_correction")], "corrected")


# ---- export entry points ---------------------------------------------------------------------------------------

def split_sample(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """The bundled sample split by position: even lines calibrate, odd lines measure (held out)."""
    return list(texts[0::2]), list(texts[1::2])


def calibration_feeds(folder: Path, texts: Sequence[str], batch_size: int = 16) -> list[dict]:
    """The artifact's own tokenization and batching of `texts`, as feeds for the fp32 model."""
    from ..runtime.manifest import load_manifest
    from ..runtime.schedule import plan_dynamic
    from ..runtime.tokenize import TextTokenizer

    tok = TextTokenizer(load_manifest(folder, check_hashes=False))
    enc = tok.encode(list(texts))
    return [tok.feeds(enc, b) for b in plan_dynamic([len(e.ids) for e in enc], batch_size)]


def quantize_artifact(folder: Path, calibration_texts: Sequence[str], options: QuantOptions | None = None) -> dict:
    """Rewrite the fp32 model.onnx of the artifact being written in `folder`; returns the manifest record."""
    model = Path(folder) / "model.onnx"
    fp32_bytes = model.stat().st_size
    feeds = calibration_feeds(folder, calibration_texts) if calibration_texts else []
    report = quantize_model(model, model, feeds, options)
    return {**report.as_manifest(), "calibration_texts": len(calibration_texts),
            "model_bytes_fp32": fp32_bytes, "model_bytes": model.stat().st_size,
            "size_ratio": round(model.stat().st_size / fp32_bytes, 4)}


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k neighbours under a ∩ under b| / k over all rows (cosine; a row is not its own neighbour)."""
    k = min(k, len(a) - 1)
    if k < 1:
        return 1.0

    def top(e: np.ndarray) -> np.ndarray:
        e = e.astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top(a), top(b))]))


def reference_batched(model_path: Path, texts: Sequence[str], max_length: int, batch_size: int = 32,
                      trust_remote_code: bool = False, set_max_length: bool = True) -> tuple[np.ndarray, str]:
    """sentence-transformers (torch, float32) embeddings in batches: for quality figures over many texts
    (padding moves torch's results by ~1e-7, far below what int8 changes). `set_max_length` as in
    parity.load_reference."""
    from .parity import load_reference

    model, version = load_reference(model_path, max_length, set_max_length=set_max_length,
                                    trust_remote_code=trust_remote_code)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32), f"sentence-transformers {version} (torch float32)"


def quality_figures(folder: Path, model_path: Path, texts: Sequence[str], max_length: int,
                    reference: np.ndarray | None = None, data: str = "", trust_remote_code: bool = False) -> dict:
    """int8 artifact against the float32 sentence-transformers reference on `texts`."""
    from ..runtime import Encoder
    from .parity import cosine_rows

    ours = Encoder(folder).encode(list(texts))
    name = "given reference embeddings"
    if reference is None:
        reference, name = reference_batched(model_path, texts, max_length, trust_remote_code=trust_remote_code)
    cos = cosine_rows(ours, reference)
    return {"reference": name, "data": data, "texts": len(texts), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()), "top10_overlap": top_k_overlap(ours, reference)}

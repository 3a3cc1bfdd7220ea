"""Export a model folder to a stableembed artifact (needs the `export` extra: torch, transformers, onnx)."""

from __future__ import annotations

import datetime as _dt
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Sequence

from ..runtime.manifest import CPU_MODEL, FORMAT, MODEL, Manifest, load_manifest
from ..runtime.schedule import check_buckets
from .cpu_graph import fuse_transformer, store_and_check
from .artifact import atomic_folder, default_buckets, externalize_weights, required_version, write_manifest
from .families import FAMILIES, Family, check_positions, family_for
from .source import Source, config_value, read_source
from .tokenizer import write_tokenizer

PRECISIONS = ("fp32", "int8")
MIN_OPSET = 13  # the kernels' Unsqueeze, ReduceSum and Squeeze take their axes as inputs

__all__ = ["export_model", "read_source", "Source", "PRECISIONS", "FAMILIES", "Family", "family_for"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("stableembed", "torch", "transformers", "onnx", "onnxruntime", "tokenizers",
                 "sentence-transformers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _machine() -> dict[str, object]:
    """The CPU the export (and its parity figures and sample bits) ran on."""
    from ..runtime.machine import cpu_info

    info = cpu_info()
    return {k: info[k] for k in ("cpu", "family_model", "flags", "isa", "key")}


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    max_length: int | None = None,
    opset: int = 17,
    exporter: str | None = None,
    buckets: Sequence[Sequence[int]] | None = None,
    parity: bool = True,
    overwrite: bool = False,
    calibration_texts: Sequence[str] | None = None,
    quality_texts: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    cpu_graph: bool = True,
) -> Manifest:
    """Export the local model folder `source` to the artifact folder `out` and return its manifest.

    The graph takes input_ids, attention_mask (and token_type_ids when the model uses them) and returns
    `sentence_embedding` with pooling, Dense layers and normalization inside. Writing is atomic.
    With `parity`, the export compares itself with sentence-transformers (torch float32), records the
    figures and fails (ValueError) outside PARITY_TOLERANCE; an int8 export holds the float32 graph it
    quantizes to that bound and only records its own figures (int8 is judged by quality, not fp32 bars).
    precision "int8" (see export/quantize.py) calibrates on `calibration_texts` (default: even lines of
    the bundled sample) and, with `parity`, records its quality against float32 sentence-transformers on
    `quality_texts` (default: the odd lines, held out from calibration).
    `exporter` None takes the model family's own (see export/families.py); an architecture outside the
    supported families is refused. `trust_remote_code` lets a model run the modeling code it ships in
    its folder (never code from elsewhere); off by default. `cpu_graph` adds model.cpu.onnx, the same model
    with onnxruntime's fused operators, which the CPU provider then runs (export/cpu_graph.py: fp32 BERT-style
    encoders, checked for batch invariance at export; the manifest's `cpu_graph` says why where none is written).
    """
    from .assemble import OUTPUT, POOLING_MASK, assemble
    from .trace import load_transformer, trace_transformer, uses_token_type_ids

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; choose one of {PRECISIONS}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    src = read_source(source)
    family = family_for(src.config, trust_remote_code, where=str(src.transformer_path / "config.json"))
    exporter = exporter or family.exporter
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        src.max_length = int(max_length)
    elif src.max_length is None:
        raise ValueError(f"{src.transformer_path}: no maximum length in its sentence-transformers config, "
                         f"tokenizer_config.json (model_max_length) or config.json (max_position_embeddings); "
                         f"pass max_length (--max-length)")
    check_positions(src.config, family, src.max_length, where=str(src.transformer_path / "config.json"))
    bucket_list = [list(map(int, b)) for b in buckets] if buckets else default_buckets(src.max_length)
    check_buckets(bucket_list, src.max_length)

    model = load_transformer(src.transformer_path, trust_remote_code)
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_type_ids(model) else [])
    traced_inputs = list(inputs)
    if not src.include_prompt:
        inputs.append(POOLING_MASK)
    with atomic_folder(Path(out), overwrite) as tmp:
        with tempfile.TemporaryDirectory() as work:
            traced = Path(work) / "transformer.onnx"
            opset = trace_transformer(model, traced, traced_inputs, opset, exporter)
            dim = assemble(traced, src, tmp / MODEL)
            cpu = _cpu_graph(traced, src, family, precision, tmp) if cpu_graph else \
                {"file": None, "reason": "not requested (cpu_graph=False)"}
        tokenizer = write_tokenizer(src, tmp / "tokenizer.json", trust_remote_code)
        cfg = src.config
        manifest = {
            "format": FORMAT,
            # 2: external weights (always), prompts, the pooling mask; 3 with a CPU graph (set below)
            "format_version": 2,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(src.path), "kind": src.kind, "weights_sha256": src.weight_hashes()},
            "architecture": {"model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
                             "hidden_size": src.hidden_size, "layers": config_value(cfg, "num_hidden_layers"),
                             "heads": config_value(cfg, "num_attention_heads"), "family": family.name,
                             "positions": family.positions, "attention": family.attention,
                             "remote_code": family.model_types == ()},
            "inputs": inputs,
            "output": OUTPUT,
            "dim": dim,
            "pooling": src.pooling,
            "dense": [{"in": d.in_features, "out": d.out_features, "activation": d.activation}
                      for d in src.dense],
            "normalize": src.normalize,
            "prompts": src.prompts,
            "default_prompt_name": src.default_prompt_name,
            "include_prompt": src.include_prompt,
            "max_length": src.max_length,
            # sentence-transformers' own truncate_dim: what its encode returns by default, the Encoder's too
            **({"truncate_dim": _checked_truncate_dim(src.truncate_dim, dim)} if src.truncate_dim else {}),
            # "argument": chosen at export, so a parity check truncates the reference there too; "model":
            # the model's own, which sentence-transformers must then use as well
            "max_length_source": "model" if max_length is None else "argument",
            # do_lower_case is a normalizer in tokenizer.json (export/tokenizer.py): no Python lowercasing
            "lowercase": False,
            "tokenizer": tokenizer,
            "pad_id": int(cfg.get("pad_token_id") or 0),
            "precision": precision,
            "opset": opset,
            "exporter": exporter,
            "shapes": {"dynamic": {"batch": "any", "length": f"2..{src.max_length}"},
                       "fixed_buckets": bucket_list},
            "libraries": _versions(),
            "exported_on": _machine(),
        }
        write_manifest(tmp, manifest)
        reference = _reference(src, max_length is not None, trust_remote_code) if parity else None
        fp32_figures = None
        if precision == "int8" and parity:  # the graph being quantized must pass the float32 bars first
            fp32_figures = _check_parity(_measure_parity(tmp, reference), "the float32 graph, before int8 quantization")
        if precision == "int8":
            _quantize_int8(tmp, src, manifest, calibration_texts, quality_texts, parity, trust_remote_code)
        # Last: everything above reads and rewrites a self-contained model.onnx; parity then measures
        # the artifact as shipped.
        manifest["weights"] = externalize_weights(tmp)
        # After model.onnx's weights are final: the CPU graph points at model.onnx.data's tensors.
        manifest["cpu_graph"] = store_and_check(tmp, manifest, cpu) if cpu["file"] else cpu
        manifest["format_version"] = required_version(manifest)
        write_manifest(tmp, manifest)
        if parity:
            figures = _measure_parity(tmp, reference)
            if fp32_figures is None:
                _check_parity(figures, "the artifact")
            else:
                figures["fp32_before_int8"] = {k: fp32_figures[k] for k in ("min_cosine", "max_abs_diff")}
            manifest["parity"] = figures
            write_manifest(tmp, manifest)
    return load_manifest(out)


def _cpu_graph(traced: Path, src: Source, family: Family, precision: str, folder: Path) -> dict:
    """Write folder/model.cpu.onnx (self-contained until `store_and_check`) and return its partial record."""
    from .assemble import assemble

    if precision != "fp32":
        return {"file": None, "reason": f"{precision} artifacts run their own quantized graph"}
    cfg = src.config
    fused = traced.with_name("transformer.fused.onnx")
    record = fuse_transformer(traced, fused, family.name, heads=int(config_value(cfg, "num_attention_heads")),
                              hidden=src.hidden_size, layers=int(config_value(cfg, "num_hidden_layers")))
    if record["file"]:
        assemble(fused, src, folder / CPU_MODEL)
    return record


def _quantize_int8(folder: Path, src: Source, manifest: dict, calibration_texts: Sequence[str] | None,
                   quality_texts: Sequence[str] | None, quality: bool, trust_remote_code: bool = False) -> None:
    """Rewrite the fp32 model in `folder` to int8 and record how, and how well, in the manifest."""
    from ..data import sample_texts
    from .quantize import quality_figures, quantize_artifact, split_sample

    cal, held = split_sample(sample_texts())
    manifest["quantization"] = quantize_artifact(folder, cal if calibration_texts is None else calibration_texts)
    write_manifest(folder, manifest)  # the int8 model's hash, before an Encoder loads it
    if quality:
        texts = held if quality_texts is None else list(quality_texts)
        data = ("bundled sample, odd lines (held out from calibration)" if quality_texts is None
                else "texts given to export_model(quality_texts=...)")
        manifest["quantization"]["quality"] = quality_figures(folder, src.path, texts, src.max_length, data=data,
                                                                trust_remote_code=trust_remote_code)
        write_manifest(folder, manifest)


def _reference(src: Source, set_max_length: bool, trust_remote_code: bool = False) -> tuple:
    """(texts, sentence-transformers' embeddings of them, its name): the bundled sample, torch float32."""
    from ..data import sample_texts
    from .parity import reference_embeddings

    texts = sample_texts()
    emb, name = reference_embeddings(src.path, texts, src.max_length, trust_remote_code=trust_remote_code,
                                     set_max_length=set_max_length)
    return texts, emb, name


def _measure_parity(folder: Path, reference: tuple) -> dict:
    from ..runtime import Encoder
    from ..runtime.verify import bits_sha256
    from .parity import parity_figures

    texts, ref, name = reference
    ours = Encoder(folder).encode(texts)
    # The bits are this machine type's (its ISA picks onnxruntime's kernels): `stableembed verify`
    # compares its own sample fingerprint with this one and says whether the machine type differs.
    return {"reference": name, "data": "bundled sample (package summaries, README paragraphs, unicode, empty)",
            **parity_figures(ours, ref), "sample_bits_sha256": bits_sha256(ours), "provider": "cpu"}


def _checked_truncate_dim(k: object, dim: int) -> int:
    from ..runtime.encoder import check_truncate_dim

    try:
        return check_truncate_dim(k, dim)  # the Encoder's own check, so export and runtime accept the same
    except ValueError as exc:
        raise ValueError(f"config_sentence_transformers.json: {exc}") from None


def _check_parity(figures: dict, what: str) -> dict:
    """`figures`, or a ValueError when they lie outside PARITY_TOLERANCE: the export then writes nothing."""
    from .parity import PARITY_TOLERANCE

    if not PARITY_TOLERANCE.accepts(figures):
        raise ValueError(f"parity with {figures['reference']} failed for {what}: min cosine "
                         f"{figures['min_cosine']:.8f}, max |diff| {figures['max_abs_diff']:.2e} on "
                         f"{figures['texts']} sample texts, outside PARITY_TOLERANCE ({PARITY_TOLERANCE}); "
                         f"nothing was written (parity=False / --no-parity exports without this check)")
    return figures

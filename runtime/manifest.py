"""The artifact's manifest: the one place that reads pooling, prompts, precision and shapes."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stamps

FORMAT = "stableembed-artifact"
# 1: the graph and its weights in model.onnx. 2: the weights in model.onnx.data beside it (`weights`);
# prompts, default_prompt_name, include_prompt (with its pooling_mask input). Version 1 artifacts still
# load. Version 2 is refused by older readers, whose TensorRT-EP cache key hashed model.onnx alone, which
# no longer covers the weights. 3: a second graph for the CPU provider (`cpu_graph`, model.cpu.onnx), written
# only with it: a version 2 reader would run model.onnx on CPU and get other bits than the manifest records.
FORMAT_VERSION = 4  # 2: external weights, prompts; 3: the fused CPU graph; 4: truncate_dim
MANIFEST = "manifest.json"
MODEL = "model.onnx"
# The graph's weights, in onnx's external-data form (page-aligned, so onnxruntime maps them instead of
# copying). Artifacts written before it existed keep their weights inside model.onnx and still load.
WEIGHTS = "model.onnx.data"
# The CPU provider's graph with onnxruntime's fused transformer operators (export/cpu_graph.py), when the
# export wrote one; it reads model.onnx.data's tensors in place and keeps only new ones in its own file.
CPU_MODEL = "model.cpu.onnx"
CPU_WEIGHTS = "model.cpu.onnx.data"


class ArtifactError(ValueError):
    """The artifact folder is missing, damaged, or from an incompatible version."""


@dataclass(frozen=True)
class Manifest:
    """Typed view of manifest.json; `raw` keeps everything for `info`."""

    folder: Path
    model_file: Path
    tokenizer_file: Path
    inputs: tuple[str, ...]
    output: str
    dim: int
    max_length: int
    lowercase: bool
    pooling: tuple[str, ...]
    normalize: bool
    precision: str
    fixed_buckets: tuple[tuple[int, int], ...]
    pad_id: int
    raw: dict[str, Any]
    prompts: dict[str, str] = field(default_factory=dict)  # name -> text put before each input text
    default_prompt_name: str | None = None  # applied when encode names no prompt (as sentence-transformers)
    include_prompt: bool = True  # False: the prompt's tokens are left out of pooling (graph input pooling_mask)
    weights_file: Path | None = None  # model.onnx's external weights (None: inside model.onnx, older artifacts)
    cpu_model_file: Path | None = None  # the CPU provider's fused graph (None: it runs model_file too)
    truncate_dim: int | None = None  # the model's own truncate_dim (sentence-transformers'): the Encoder's default

    @property
    def model_sha256(self) -> str:
        """One digest of the graph and its weights (the sha256 of model.onnx alone for single-file artifacts)."""
        files = self.raw["files"]
        if self.weights_file is None:
            return files[MODEL]["sha256"]
        return hashlib.sha256(f"{files[MODEL]['sha256']}:{files[self.weights_file.name]['sha256']}".encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(folder: Path, name: str) -> Path:
    """`folder / name` for a plain file name. The name is checked, not the path it resolves to: a file
    may be a symlink (a Hugging Face snapshot's files point into its blob store); its sha256 guards it."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or Path(name).is_absolute()):
        raise ArtifactError(f"manifest names a file outside the artifact folder: {name!r}")
    return folder / name


def check_sha256(path: Path, name: str, expected: str, rehash: bool = False) -> None:
    """ArtifactError unless `path` has the sha256 `expected`. A large file that an earlier check stamped
    and that has not changed since is not re-read, unless `rehash` (runtime/stamps.py)."""
    before, started = path.stat(), time.time()
    stampable = before.st_size >= stamps.STAMP_MIN_BYTES  # small files: re-read every time (about 1 ms)
    if stampable and not rehash and stamps.is_stamped(path, expected):
        return
    if sha256_file(path) != expected:
        raise ArtifactError(f"artifact file {name} does not match its sha256 in the manifest")
    if stampable:
        stamps.hash_checked(path, expected, before, started)


def load_manifest(folder: str | Path, check_hashes: bool = True, rehash: bool = False) -> Manifest:
    """Read and check an artifact's manifest; with `check_hashes`, every file's sha256 too (a large file
    stamped by an earlier check and unchanged since is trusted without a re-read, unless `rehash`)."""
    folder = Path(folder).expanduser().resolve()
    mfile = folder / MANIFEST
    if not mfile.is_file():
        raise ArtifactError(f"{folder} is not a stableembed artifact: {MANIFEST} is missing")
    try:
        raw = json.loads(mfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mfile} is damaged: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{mfile} is not a {FORMAT} manifest")
    version = raw.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(f"{mfile} has format version {version}; this stableembed reads version "
                            f"{FORMAT_VERSION} and older: upgrade stableembed to load it")
    try:
        files = raw.get("files", {})
        weights = (raw.get("weights") or {}).get("file")
        cpu = raw.get("cpu_graph") or {}
        cpu_model = cpu.get("file")
        cpu_weights = (cpu.get("weights") or {}).get("own", {}).get("file") if cpu_model else None
        for name in (MODEL, "tokenizer.json") + tuple(n for n in (weights, cpu_model, cpu_weights) if n):
            if name not in files:
                raise ArtifactError(f"{mfile} lists no {name}")
        for name, meta in files.items():
            path = _inside(folder, name)
            if not path.is_file():
                raise ArtifactError(f"artifact file {name} is missing from {folder}")
            if path.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {name} is damaged or truncated: {path.stat().st_size} "
                                    f"bytes, manifest says {meta['bytes']}")
            if check_hashes:
                check_sha256(path, name, meta["sha256"], rehash)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a files record of the wrong shape
        raise ArtifactError(f"{mfile} has a bad files record: {exc!r}") from exc
    try:
        return Manifest(
            folder=folder,
            model_file=folder / MODEL,
            tokenizer_file=folder / "tokenizer.json",
            inputs=tuple(raw["inputs"]),
            output=raw["output"],
            dim=_positive(raw["dim"], "dim"),
            max_length=_positive(raw["max_length"], "max_length"),
            lowercase=bool(raw.get("lowercase", False)),
            pooling=tuple(raw["pooling"]),
            normalize=bool(raw["normalize"]),
            precision=raw["precision"],
            fixed_buckets=tuple((int(b), int(t)) for b, t in raw["shapes"]["fixed_buckets"]),
            pad_id=int(raw.get("pad_id", 0)),
            raw=raw,
            **_prompt_fields(raw),
            weights_file=_inside(folder, weights) if weights else None,
            cpu_model_file=_inside(folder, cpu_model) if cpu_model else None,
            truncate_dim=_truncate_dim(raw),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{mfile} is missing or has a bad field: {exc}") from exc


def _truncate_dim(raw: dict[str, Any]) -> int | None:
    if raw.get("truncate_dim") is None:
        return None
    k = _positive(raw["truncate_dim"], "truncate_dim")
    if k > int(raw["dim"]):
        raise ValueError(f"truncate_dim {k} is beyond dim {raw['dim']}")
    return k


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _prompt_fields(raw: dict[str, Any]) -> dict[str, Any]:
    prompts = raw.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ValueError("prompts must map names to strings")
    default = raw.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"default_prompt_name {default!r} is not one of the prompts")
    include = bool(raw.get("include_prompt", True))
    if include == ("pooling_mask" in raw["inputs"]):
        raise ValueError("include_prompt=false goes with a pooling_mask input, and only then")
    return {"prompts": dict(prompts), "default_prompt_name": default, "include_prompt": include}

"""Write an artifact folder atomically: build in a temporary sibling, fsync, rename into place."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..runtime.manifest import MANIFEST, MODEL, WEIGHTS, sha256_file

# Every initializer of at least this many bytes goes to the data file. onnxruntime's CPU provider
# memory-maps external initializers instead of reading them into heap buffers, so the weights are neither
# held twice while loading (protobuf bytes + tensors) nor copied afterwards: peak RSS after loading
# all-MiniLM-L6-v2 fell from 211 to 124 MB (measured). Each tensor starts on a page boundary
# (ALIGNMENT), as onnxruntime's own external-data writer aligns them, so a mapping holds one tensor's
# pages only; onnxruntime 1.32 also maps unaligned offsets (it aligns the mapping down), so this is
# not what makes mapping work, but it keeps tensors from sharing pages.
EXTERNAL_MIN_BYTES = 1024
ALIGNMENT = 4096


# Largest padded size (batch x length) of a default fixed bucket other than batch 1: long-context models
# (8k-32k tokens) would otherwise get 32 x 8192 buckets whose attention scores alone take gigabytes.
BUCKET_TOKENS = 32 * 512


def default_buckets(max_length: int) -> list[list[int]]:
    """Power-of-two lengths from 16 up to max_length (and max_length itself), each with batch 1, 8 and 32
    where batch x length <= BUCKET_TOKENS (batch 1 always)."""
    lengths, n = [], 16
    while n < max_length:
        lengths.append(n)
        n *= 2
    lengths.append(max_length)
    return [[b, t] for t in lengths for b in (1, 8, 32) if b == 1 or b * t <= BUCKET_TOKENS]


def parse_buckets(text: str) -> list[list[int]]:
    """'8x16,32x128' -> [[8, 16], [32, 128]] (batch x length)."""
    out = []
    for part in text.split(","):
        try:
            b, t = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {part!r} is not BATCHxLENGTH") from None
        if b < 1 or t < 2:
            raise ValueError(f"bucket {part!r}: batch must be >= 1 and length >= 2")
        out.append([b, t])
    return out


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    platform, C library or file system has no such call (the caller then falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it takes `out`'s place in one step (a rename, or
    for an existing `out` an exchange, where the system has one)."""
    out = out.expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not (out / MANIFEST).is_file():  # --overwrite on the wrong path must not delete it
        raise FileExistsError(f"{out} exists and is not an artifact (no {MANIFEST}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir, not mkdtemp: the folder gets the mode any mkdir gets (0777 less the umask), not 0700
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists() and exchange(tmp, out):
            pass  # one step: a loader finds the old artifact or the new one; `tmp` now holds the old (removed below)
        elif out.exists():
            # Two renames: between them `out` is missing, and a kill there leaves the old artifact in
            # `old` (README, The artifact). A failed second rename puts it back.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():  # what an exchange brought here: the old `out` as a link or file
            tmp.unlink()


def externalize_weights(folder: Path) -> dict:
    """Move the initializers of `folder`/model.onnx into one data file beside it (WEIGHTS), page-aligned.

    The last step of an export: everything before it (assembly, int8 rewriting, TensorRT preparation)
    reads and writes a self-contained model.onnx; `onnx.load` reads either form. The outputs are the
    same bits (tested). Returns the manifest's `weights` record.
    """
    from .._extras import require

    onnx = require("onnx", "export")
    from onnx.external_data_helper import set_external_data

    path, data = folder / MODEL, folder / WEIGHTS
    model = onnx.load(str(path))
    data.unlink(missing_ok=True)
    offset = tensors = padding = 0
    for t in model.graph.initializer:
        n = len(t.raw_data) if t.HasField("raw_data") else 0
        if n < EXTERNAL_MIN_BYTES:
            continue  # small constants stay in the graph; float_data/int64_data tensors too
        aligned = -(-offset // ALIGNMENT) * ALIGNMENT
        padding += aligned - offset
        # onnx.save_model writes each tensor at its given offset, zero-padding the gap before it
        set_external_data(t, WEIGHTS, offset=aligned, length=n)
        offset, tensors = aligned + n, tensors + 1
    if not tensors:
        return {"file": None, "tensors": 0}
    onnx.save_model(model, str(path))
    os.chmod(data, path.stat().st_mode & 0o777)  # onnx creates it 0600; the artifact's files share one mode
    if data.stat().st_size != offset:
        raise RuntimeError(f"{data}: wrote {data.stat().st_size} bytes, expected {offset}")
    return {"file": WEIGHTS, "tensors": tensors, "bytes": offset, "alignment": ALIGNMENT, "padding_bytes": padding}


def required_version(manifest: dict) -> int:
    """The oldest format version whose readers understand everything `manifest` holds (an older reader
    refuses a newer version rather than silently ignoring what it cannot read): 2 for every export (external
    weights, prompts, the pooling mask), 3 with a fused CPU graph, 4 with a truncate_dim."""
    if manifest.get("truncate_dim") is not None:
        return 4
    return 3 if (manifest.get("cpu_graph") or {}).get("file") else 2


def write_manifest(folder: Path, manifest: dict) -> None:
    """Add the size and sha256 of every file in `folder`, then write manifest.json last."""
    manifest["files"] = {
        f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST and not f.name.startswith(f".{MANIFEST}.tmp-")
    }
    # A new file renamed over the old: a reader never sees a half-written manifest (build-trt rewrites
    # the manifest of an artifact that may be in use).
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)

"""Write an artifact folder atomically: build in a temporary sibling, fsync, rename into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..runtime.manifest import MANIFEST, sha256_file


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


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename."""
    out = out.expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Add the size and sha256 of every file in `folder`, then write manifest.json last."""
    manifest["files"] = {
        f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""Records of artifact files whose sha256 matched, so a load need not re-read an unchanged 90 MB file.

Hashing all-MiniLM-L6-v2's weights costs about 0.08 s of a 0.5 s cold start (README, Performance). After a
large file's sha256 has matched its manifest, a *stamp* records the file's device, inode, size, mtime and
ctime (nanoseconds) beside the digest; a later load skips the read only when all of them are unchanged. Any
write, truncation, rename onto the path or `touch` moves the ctime, which no user-space call can set back (git
trusts its index the same way). A stamp is not a hash: it does not catch a disk that flips bits under an
unchanged inode, which `stableembed verify` (always a full re-read) does.

A file changed less than STAMP_MARGIN_S before its check began is not stamped: on a file system with
coarse timestamps, a write right after the check could keep the ctime (git's "racy" case). Stamps live in
`$STABLEEMBED_CACHE/verified/` (default `~/.cache/stableembed`), one small JSON file per artifact file,
named by its path; stamps of files that no longer exist are removed whenever a new stamp is written. The
cache only ever saves work: a stamp that cannot be read or written means the file is
hashed, as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# Files smaller than this are hashed on every load (the graph, the tokenizer: about a millisecond).
STAMP_MIN_BYTES = 8 << 20
# FAT timestamps have 2 s resolution; every file system Linux uses for data is at least that fine.
STAMP_MARGIN_S = 2.0
_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def cache_root() -> Path:
    """$STABLEEMBED_CACHE, default ~/.cache/stableembed (TensorRT engines, hash stamps)."""
    return Path(os.environ.get("STABLEEMBED_CACHE", "~/.cache/stableembed")).expanduser()


def _stamp_file(path: Path) -> Path:
    return cache_root() / "verified" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def _identity(st: os.stat_result) -> list[int]:
    return [int(getattr(st, f)) for f in _FIELDS]


def is_stamped(path: Path, sha256: str) -> bool:
    """True when a stamp says `path`, exactly as it is now, had this sha256."""
    try:
        record = json.loads(_stamp_file(path).read_text(encoding="utf-8"))
        return (record.get("path") == str(path) and record.get("sha256") == sha256
                and record.get("stat") == _identity(path.stat()))
    except (OSError, ValueError, AttributeError):
        return False


def hash_checked(path: Path, sha256: str, before: os.stat_result, started: float) -> None:
    """Record that `path` matched `sha256` in a check that began at `started` (time.time()) with `path`
    stat'ed as `before`. Nothing is written if the file changed during the check or shortly before it."""
    import tempfile  # only when a stamp is written (keeps `import stableembed` lean)

    try:
        after = path.stat()
        if _identity(after) != _identity(before) or after.st_ctime_ns / 1e9 > started - STAMP_MARGIN_S:
            return
        target = _stamp_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".stamp-")
    except OSError:
        return  # an unwritable cache costs the next load a hash, nothing else
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"path": str(path), "sha256": sha256, "stat": _identity(after),
                       "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old stamp or the new one
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return
    prune(target.parent)


def prune(folder: Path) -> int:
    """Remove the stamps in `folder` whose file no longer exists (a deleted or moved artifact); returns how
    many. Runs after each new stamp, so the cache holds about one stamp per large artifact file on disk.
    Safe beside concurrent loads: a stamp is removed only when its path is gone, and a missing stamp only
    costs a hash."""
    removed = 0
    for stamp in folder.glob("*.json"):
        try:
            gone = not Path(json.loads(stamp.read_text(encoding="utf-8"))["path"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            gone = True  # unreadable: it would never be trusted anyway
        if gone:
            try:
                stamp.unlink()
                removed += 1
            except OSError:
                pass
    return removed

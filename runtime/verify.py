"""Check the stability guarantee on this machine: the same bits alone, batched, shuffled, fixed or
dynamic, with 1 or 2 threads, and in a fresh process."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .encoder import Encoder


@dataclass
class StabilityReport:
    texts: int
    results: dict[str, int] = field(default_factory=dict)  # variant -> texts bit-identical to alone
    bits_sha256: str = ""  # of the texts' embeddings computed alone: compare across machines

    @property
    def ok(self) -> bool:
        return all(v == self.texts for v in self.results.values())


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: True where every component has identical bits."""
    return (np.ascontiguousarray(a).view(np.uint32) == np.ascontiguousarray(b).view(np.uint32)).all(axis=-1)


def bits_sha256(embeddings: np.ndarray) -> str:
    """sha256 of the embeddings' float32 bits (row-major, little-endian): one value to compare between
    machines, providers or versions for the same texts."""
    return hashlib.sha256(np.ascontiguousarray(embeddings, dtype="<f4").tobytes()).hexdigest()


def _fresh_process(path: Path, texts: Sequence[str], threads: int, provider: str, prompt: dict) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "texts.json", Path(tmp) / "out.npy"
        src.write_text(json.dumps({"texts": list(texts), "prompt": prompt}), encoding="utf-8")
        code = ("import json,sys,numpy as np; from stableembed import Encoder; "
                "d=json.load(open(sys.argv[2],encoding='utf-8')); "
                "np.save(sys.argv[3], Encoder(sys.argv[1], threads=int(sys.argv[4]), provider=sys.argv[5])"
                ".encode(d['texts'], batch_size=16, **d['prompt']))")
        done = subprocess.run([sys.executable, "-c", code, str(path), str(src), str(dst), str(threads), provider],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        if done.returncode != 0:  # the check could not run: not a verdict on the guarantee
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"the fresh-process check could not run (exit status {done.returncode}): {tail[0]}")
        return np.load(dst)


def check_stability(path: str | Path, texts: Sequence[str], fresh_process: bool = True, seed: int = 0, *,
                    provider: str = "cpu", prompt_name: str | None = None,
                    prompt: str | None = None) -> StabilityReport:
    """Encode each text alone (reference), then in many batch arrangements; count identical rows.
    Every arrangement runs on `provider` (the guarantee holds per artifact and provider);
    `prompt_name` / `prompt` as in `Encoder.encode`, the same for every encoding."""
    path = Path(path)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to check the guarantee on")
    report = StabilityReport(len(texts))
    alone_enc = Encoder(path, threads=1, provider=provider)
    kw = {"prompt_name": prompt_name, "prompt": prompt}
    alone = np.stack([alone_enc.encode(t, **kw) for t in texts])
    report.bits_sha256 = bits_sha256(alone)
    rng = random.Random(seed)
    for mode in ("dynamic", "fixed"):
        for threads in (1, 2):
            enc = alone_enc if (mode, threads) == ("dynamic", 1) else Encoder(path, mode=mode, threads=threads,
                                                                               provider=provider, check_hashes=False)
            for batch_size in (2, 8, 32):
                order = list(range(len(texts)))
                rng.shuffle(order)
                out = np.empty_like(alone)
                out[order] = enc.encode([texts[i] for i in order], batch_size=batch_size, **kw)
                key = f"{mode}, {threads} thread(s), batch {batch_size}, shuffled"
                report.results[key] = int(same_bits(out, alone).sum())
                if mode == "fixed":
                    break  # fixed mode's batch sizes come from the buckets
    if fresh_process:
        for threads in (1, 2):
            out = _fresh_process(path, texts, threads, provider, kw)
            report.results[f"fresh process, {threads} thread(s), batch 16"] = int(same_bits(out, alone).sum())
    return report

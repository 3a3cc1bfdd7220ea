"""Parity against sentence-transformers (torch, fp32): the reference this project is measured against."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np


class ParityTolerance(NamedTuple):
    """Bounds on a float32 artifact's distance to sentence-transformers' own embeddings."""

    min_cosine: float
    max_abs_diff: float  # per component

    def accepts(self, figures: dict) -> bool:
        """Whether `parity_figures(...)` lies within these bounds."""
        return figures["min_cosine"] >= self.min_cosine and figures["max_abs_diff"] <= self.max_abs_diff

    def __str__(self) -> str:
        return f"min cosine {self.min_cosine}, max |diff| {self.max_abs_diff:.0e}"


# The stated parity of fp32 artifacts, in one place: `stableembed verify --parity` and the parity tests.
PARITY_TOLERANCE = ParityTolerance(min_cosine=0.99999, max_abs_diff=1e-5)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-300)


def reference_embeddings(model_path: Path, texts: Sequence[str], max_length: int, prompt_name: str | None = None,
                         prompt: str | None = None, trust_remote_code: bool = False) -> tuple[np.ndarray, str]:
    """sentence-transformers' own embeddings (one text at a time, so no padding is involved); the prompt
    arguments are its `encode`'s (none: the model's default prompt, if it has one)."""
    from .._extras import require

    st = require("sentence_transformers", "export")
    model = st.SentenceTransformer(str(model_path), device="cpu", trust_remote_code=trust_remote_code,
                                   local_files_only=True)
    model.max_seq_length = max_length
    emb = np.stack([model.encode([t], convert_to_numpy=True, prompt_name=prompt_name, prompt=prompt)[0]
                    for t in texts]).astype(np.float32)
    return emb, f"sentence-transformers {st.__version__}"


def parity_figures(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = cosine_rows(ours, ref)
    return {
        "texts": int(len(ours)),
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()),
    }

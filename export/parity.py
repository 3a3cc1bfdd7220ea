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


def st_max_length(model) -> int | None:
    """Tokens sentence-transformers keeps of a text: its Transformer's `processing_kwargs` max_length
    ("common" over "text", as it merges them into the tokenizer call), else `max_seq_length`."""
    kwargs = getattr(model[0], "processing_kwargs", None) or {}
    for key in ("common", "text"):
        if (kwargs.get(key) or {}).get("max_length") is not None:
            return int(kwargs[key]["max_length"])
    return model.max_seq_length


def load_reference(model_path: Path, max_length: int, *, set_max_length: bool = False,
                   trust_remote_code: bool = False):
    """sentence-transformers' model of `model_path` in torch float32 (a bf16 or fp16 checkpoint is
    upcast as the exported graph is). With `set_max_length` (the user chose max_length), it truncates
    at `max_length`; otherwise its own length must be `max_length`, else ValueError naming both: a
    mismatch means the export read the model's settings otherwise than sentence-transformers does."""
    from .._extras import require

    torch = require("torch", "export")
    st = require("sentence_transformers", "export")
    model = st.SentenceTransformer(str(model_path), device="cpu", trust_remote_code=trust_remote_code,
                                   local_files_only=True, model_kwargs={"dtype": torch.float32})
    if set_max_length:
        model.max_seq_length = max_length
        kwargs = getattr(model[0], "processing_kwargs", None)
        if kwargs:  # a max_length there would win over max_seq_length
            model[0].processing_kwargs = {**kwargs, **{k: {**kwargs[k], "max_length": max_length}
                                                       for k in ("common", "text") if (kwargs.get(k) or {})
                                                       .get("max_length") is not None}}
    elif st_max_length(model) != max_length:
        raise ValueError(f"sentence-transformers truncates {model_path} at {st_max_length(model)} tokens, the "
                         f"artifact's manifest says max_length {max_length}: the export read the model's "
                         f"length settings otherwise (pass max_length explicitly to choose one)")
    return model, st.__version__


def reference_embeddings(model_path: Path, texts: Sequence[str], max_length: int, prompt_name: str | None = None,
                         prompt: str | None = None, trust_remote_code: bool = False,
                         set_max_length: bool = False) -> tuple[np.ndarray, str]:
    """sentence-transformers' own embeddings, torch float32 (one text at a time, so no padding is
    involved); the prompt arguments are its `encode`'s (none: the model's default prompt, if it has
    one); `set_max_length` as in `load_reference`."""
    model, version = load_reference(model_path, max_length, set_max_length=set_max_length,
                                    trust_remote_code=trust_remote_code)
    emb = np.stack([model.encode([t], convert_to_numpy=True, prompt_name=prompt_name, prompt=prompt)[0]
                    for t in texts]).astype(np.float32)
    return emb, f"sentence-transformers {version} (torch float32)"


def parity_figures(ours: np.ndarray, ref: np.ndarray) -> dict:
    cos = cosine_rows(ours, ref)
    return {
        "texts": int(len(ours)),
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()),
    }

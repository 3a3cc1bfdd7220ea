"""Text checks and tokenization with the artifact's tokenizer.json, as sentence-transformers does it."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from .manifest import Manifest
from .schedule import Batch


def check_texts(texts: Iterable[object]) -> list[str]:
    """The texts as a list; TypeError / ValueError naming the index of the first bad one."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text at index {i} is {type(t).__name__}, not str")
        out.append(t)
    return out


class TextTokenizer:
    """Strips (as sentence-transformers does), lowercases when the model asks, truncates to max_length."""

    def __init__(self, manifest: Manifest):
        self.tokenizer = Tokenizer.from_file(str(manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(manifest.max_length)
        self.lowercase = manifest.lowercase
        self.inputs = manifest.inputs
        self.pad_id = manifest.pad_id

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        prepared = [t.strip() for t in texts]
        if self.lowercase:
            prepared = [t.lower() for t in prepared]
        try:
            return self.tokenizer.encode_batch(prepared)
        except Exception:
            for i, t in enumerate(prepared):  # find the culprit and name it
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"text at index {i} cannot be encoded as UTF-8: {exc.reason}") from None
            raise

    def feeds(self, encodings: Sequence[Encoding], batch: Batch) -> dict[str, np.ndarray]:
        """int64 [rows, length] arrays; filler rows repeat the first real row (valid data: no NaN, no slow path)."""
        ids = np.full((batch.rows, batch.length), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch.rows, batch.length), dtype=np.int64)
        types = np.zeros((batch.rows, batch.length), dtype=np.int64) if "token_type_ids" in self.inputs else None
        for row in range(batch.rows):
            enc = encodings[batch.indices[row] if row < len(batch.indices) else batch.indices[0]]
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        return feeds

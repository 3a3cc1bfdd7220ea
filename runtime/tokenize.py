"""Text checks and tokenization with the artifact's tokenizer.json, as sentence-transformers does it."""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from .manifest import Manifest
from .schedule import Batch

# A text longer than max_length * CUT_RATIO characters is first cut to a prefix (at whitespace), so a
# 1 MB text costs milliseconds, not seconds. The prefix is kept only if its encoding proves that its first
# max_length tokens are the whole text's (`_prefix_holds`): it overflows max_length, and its last kept
# token belongs to an earlier pre-token (word) than the prefix's last one, so only that last word, which
# the cut may have split, depends on what follows the cut. Otherwise the prefix grows fourfold; past
# max_length * READ_RATIO characters the whole text is tokenized (say, 300,000 spaces before the first
# word: seconds, but the right tokens).
CUT_RATIO = 32
READ_RATIO = 1024
_SPACE = re.compile(r"\s")


def check_texts(texts: Iterable[object]) -> list[str]:
    """The texts as a list; TypeError naming the index of the first non-str item."""
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts must be a str or an iterable of str, not bytes")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text at index {i} is {type(t).__name__}, not str")
        out.append(t)
    return out


# sentence-transformers (6) gives every model these prompt names, empty unless the model sets them.
BUILTIN_PROMPTS = ("query", "document")


def model_prompts(manifest: Manifest) -> dict[str, str]:
    """The prompt names a model accepts and their texts: its own, plus sentence-transformers' built-in
    empty "query" and "document" where it does not set them."""
    return {**{name: "" for name in BUILTIN_PROMPTS}, **manifest.prompts}


def resolve_prompt(manifest: Manifest, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
    """The prompt text to put before each input, as sentence-transformers' `encode` chooses it: `prompt`
    when given (it wins over `prompt_name`), else the prompt named `prompt_name`, else the model's
    default prompt, else none. An unknown name is a ValueError naming the known ones."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        if prompt_name is not None:
            warnings.warn(f"both prompt and prompt_name={prompt_name!r} given: using prompt, as "
                          f"sentence-transformers does", stacklevel=3)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # else it would surface as the first text's fault
            raise ValueError(f"prompt cannot be encoded as UTF-8 ({exc.reason} at character {exc.start})") from None
        return prompt
    prompts = model_prompts(manifest)
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"unknown prompt name {prompt_name!r}; this model's prompts: "
                             f"{', '.join(map(repr, prompts))}")
        return prompts[prompt_name]
    if manifest.default_prompt_name is not None:
        return prompts[manifest.default_prompt_name]
    return None


def _cut(text: str, limit: int) -> str:
    """Prefix of at least `limit` characters, ending before a whitespace when one follows soon (only a
    likely word boundary: `_prefix_holds` decides whether the prefix will do)."""
    if len(text) <= limit:
        return text
    m = _SPACE.search(text, limit, 2 * limit)
    return text[: m.start() if m else limit]


def _prefix_holds(enc: Encoding) -> bool:
    """Whether a prefix's truncated encoding holds the whole text's first max_length tokens: the prefix
    overflows, and its last kept token lies in an earlier word than the prefix's last token. Tokenizers
    split words before they split tokens, and a word boundary before the cut word does not depend on what
    follows the cut; so every kept token comes from complete words, tokenized as in the whole text."""
    if not enc.overflowing:
        return False
    kept = [w for w in enc.word_ids if w is not None]
    rest = [w for o in enc.overflowing for w in o.word_ids if w is not None]
    return bool(kept) and bool(rest) and rest[-1] > kept[-1]


def _check_utf8(text: str, index: int) -> None:
    """ValueError naming `index` when `text` cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text at index {index} cannot be encoded as UTF-8 ({exc.reason} at character "
                         f"{exc.start})") from None


class TextTokenizer:
    """Lowercases when the model asks, truncates to max_length: as sentence-transformers 6 tokenizes
    (no stripping: for byte-level BPE models leading and trailing spaces are tokens)."""

    def __init__(self, manifest: Manifest, truncate: bool = True):
        self.tokenizer = Tokenizer.from_file(str(manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(manifest.max_length)
        self.max_length = manifest.max_length
        self.truncate = truncate
        self.lowercase = manifest.lowercase
        self.inputs = manifest.inputs
        self.pad_id = manifest.pad_id
        self.pooling_mask = "pooling_mask" in manifest.inputs  # include_prompt=False: prompts not pooled

    def _prepare(self, texts: Sequence[str]) -> list[str]:
        return [t.lower() for t in texts] if self.lowercase else list(texts)

    def _encode_batch(self, texts: list[str], originals: Sequence[str] | None = None) -> list[Encoding]:
        """Encodings of `texts`; a text that cannot be encoded as UTF-8 is named by its index, with the
        character counted in `originals` (the caller's texts, before a prompt and lowercasing) when given."""
        try:
            if len(texts) == 1:  # one text: no hand-off to the tokenizer's thread pool (same encoding)
                return [self.tokenizer.encode(texts[0])]
            return self.tokenizer.encode_batch(texts)
        except Exception:
            for i, t in enumerate(texts if originals is None else originals):  # find the culprit and name it
                _check_utf8(t, i)
            raise

    def prompt_length(self, prompt: str | None) -> int:
        """Leading tokens of a prompted text that pooling leaves out: 0 unless the model's Pooling has
        include_prompt=False and the prompt is not empty; then, as sentence-transformers 6 counts them,
        the prompt's tokens when tokenized alone (special tokens included, truncated like any text), less
        a trailing special token (the end token a text's tokens have after it, not within the prompt)."""
        if not prompt or not self.pooling_mask:
            return 0
        enc = self._encode_batch(self._prepare([prompt]))[0]
        return len(enc.ids) - (1 if enc.ids and enc.special_tokens_mask[-1] else 0)

    def encode(self, texts: Sequence[str], prompt: str | None = None) -> list[Encoding]:
        """Token encodings of `texts` (each preceded by `prompt` when given, as sentence-transformers
        joins them: prompt + text), truncated to max_length."""
        originals = texts  # a bad character is counted in the caller's text, not after the prompt
        if prompt:
            texts = [prompt + t for t in texts]
        prepared = self._prepare(texts)
        limit, read_limit = self.max_length * CUT_RATIO, self.max_length * READ_RATIO
        cut = {i: limit for i, t in enumerate(prepared) if len(t) > limit}
        for i in cut:  # tokenized from a prefix: its tail must still be valid text, checked here by its index
            _check_utf8(originals[i], i)
        encodings = self._encode_batch([_cut(t, limit) for t in prepared], originals)
        while cut:  # a prefix that does not prove its tokens grows, in the end to the whole text
            grow = {}
            for i, n in cut.items():
                if _prefix_holds(encodings[i]):
                    continue
                n *= 4
                whole = n > read_limit or len(prepared[i]) <= n
                encodings[i] = self._encode_batch([prepared[i] if whole else _cut(prepared[i], n)])[0]
                if not whole:
                    grow[i] = n
            cut = grow
        if not self.truncate:
            # An accepted prefix overflows, and so does the whole text: it has those words and more.
            for i, enc in enumerate(encodings):
                if enc.overflowing:
                    raise ValueError(f"text at index {i} is longer than max_length ({self.max_length} tokens) "
                                     f"and truncation is off")
        return encodings

    def feeds(self, encodings: Sequence[Encoding], batch: Batch,
              prompt_lengths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """int64 [rows, length] arrays; filler rows repeat the first real row (valid data: no NaN, no slow path).
        `prompt_lengths` (per encoding, default 0) clear each row's leading prompt tokens in the pooling mask
        of a model whose Pooling has include_prompt=False; other models take no pooling mask."""
        ids = np.full((batch.rows, batch.length), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch.rows, batch.length), dtype=np.int64)
        types = np.zeros((batch.rows, batch.length), dtype=np.int64) if "token_type_ids" in self.inputs else None
        pool = np.zeros((batch.rows, batch.length), dtype=np.int64) if self.pooling_mask else None
        for row in range(batch.rows):
            index = batch.indices[row] if row < len(batch.indices) else batch.indices[0]
            enc = encodings[index]
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = enc.type_ids
            if pool is not None:
                pool[row, min(prompt_lengths[index] if prompt_lengths else 0, n):n] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        if pool is not None:
            feeds["pooling_mask"] = pool
        return feeds

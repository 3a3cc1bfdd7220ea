"""The artifact's tokenizer.json: checked against the tokenizer transformers loads from the same folder.

sentence-transformers tokenizes with `AutoTokenizer.from_pretrained(folder, **processor_kwargs)`, and
transformers does not always run the folder's tokenizer.json as written: a tokenizer class rebuilds parts
of the pipeline from tokenizer_config.json (`do_lower_case`, `add_bos_token` / `add_eos_token`,
`add_prefix_space`) or from the keyword arguments sentence_bert_config.json passes. The runtime reads
tokenizer.json with the `tokenizers` library alone, so the export checks, text by text, that the file it
ships gives the ids transformers gives, and ships transformers' own pipeline where the folder's file
does not. sentence-transformers' own `do_lower_case` is a Lowercase normalizer it puts in front of the
tokenizer's: the shipped tokenizer.json gets the same one, so the runtime needs no Python lowercasing
(str.lower() differs from it on a word-final capital sigma and on special-token literals such as "[SEP]").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from .._extras import require
from .source import Source

# Besides the bundled sample: what tokenizers tell apart (case, accents, edge spaces, scripts, emoji,
# control characters) and a text cut at max_length.
PROBES = (
    "Hello World", "HELLO world, Hello WORLD!", "  leading and trailing spaces  ", "tab\tand\nnewline",
    "Ünïcödé àccents: naïve café, Straße, İstanbul", "中文字符和日本語のテキスト", "emoji 🙂🚀 and symbols ©®™",
    "word" * 40, "to\x1cgether and zero\u200bwidth", "",
    # a word-final capital sigma and special-token literals: where str.lower() and a Lowercase normalizer part
    "ΟΔΟΣ ΑΘΗΝΑΣ, Σ", "A [SEP] B [CLS] <s> </s> [MASK]",
)


def probe_texts(lowercase: bool, prompts: Sequence[str] = ()) -> list[str]:
    """The texts both tokenizers must agree on: the bundled sample and PROBES, the model's prompts before
    a question (as sentence-transformers joins them), and one text far beyond any max_length; with
    `lowercase`, lowercased as the runtime lowercases them for an artifact whose manifest says lowercase
    (older exports; new ones lowercase in tokenizer.json's normalizer)."""
    from ..data import sample_texts

    texts = list(sample_texts()) + list(PROBES) + [" ".join(f"token{i} Word{i}" for i in range(2000))]
    texts += [p + "What is the capital of France?" for p in prompts if p]
    return [t.lower() for t in texts] if lowercase else texts


def lowercase_as_sentence_transformers(tokenizer) -> None:
    """Put a Lowercase normalizer in front of `tokenizer`'s (a `tokenizers.Tokenizer`), as
    sentence-transformers 6's Transformer module does for do_lower_case: unless the normalizer is a
    Lowercase or a Sequence holding one at its top level."""
    from tokenizers.normalizers import Lowercase, Sequence

    normalizer = tokenizer.normalizer
    if isinstance(normalizer, Lowercase) or (isinstance(normalizer, Sequence)
                                             and any(isinstance(n, Lowercase) for n in normalizer)):
        return
    rest = list(normalizer) if isinstance(normalizer, Sequence) else [] if normalizer is None else [normalizer]
    tokenizer.normalizer = Sequence([Lowercase(), *rest])


def tokenizer_kwargs(src: Source) -> dict:
    """The keyword arguments sentence-transformers passes to AutoTokenizer for this model (hub options dropped)."""
    hub = {"revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "force_download", "proxies"}
    return {k: v for k, v in src.tokenizer_kwargs.items() if k not in hub}


def first_difference(tokenizer_json: Path, texts: Sequence[str], expected: Sequence[Sequence[int]],
                     max_length: int) -> tuple[int, list[int]] | None:
    """(index, ids) of the first text whose ids from `tokenizer_json` (as the runtime runs it: no padding,
    truncated to max_length) are not `expected`'s; None when every text agrees."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length)
    for i, text in enumerate(texts):
        ids = tok.encode(text).ids
        if ids != list(expected[i]):
            return i, ids
    return None


def write_tokenizer(src: Source, dest: Path, trust_remote_code: bool = False) -> dict:
    """Write `dest` (the artifact's tokenizer.json) and return its manifest record: the folder's own
    tokenizer.json when it tokenizes every probe text as transformers does, otherwise the pipeline
    transformers built from the folder. Raise ValueError, naming a text and both id lists, when neither
    agrees (a tokenizer whose Python code does what no tokenizer.json can hold)."""
    transformers = require("transformers", "export")
    folder = src.transformer_path
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                     **tokenizer_kwargs(src))
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{folder}: transformers loads a slow (Python) tokenizer ({type(hf).__name__}); "
                         f"the runtime needs a fast one (tokenizer.json)")
    if getattr(hf, "truncation_side", "right") != "right":
        raise ValueError(f"{folder}: truncation_side {hf.truncation_side!r} (tokenizer_config.json or "
                         f"processor_kwargs) is not supported: the runtime keeps a long text's first tokens")
    if src.lowercase:
        lowercase_as_sentence_transformers(hf.backend_tokenizer)
    # Serialized before it is called: a call sets truncation and padding on the backend.
    rebuilt = hf.backend_tokenizer.to_str()
    texts = probe_texts(False, list(src.prompts.values()))
    expected = [hf(t, truncation=True, max_length=src.max_length)["input_ids"] for t in texts]
    record = {"checked_texts": len(texts), "reference": f"transformers {transformers.__version__} "
                                                        f"{type(hf).__name__}"}
    if src.lowercase:
        record["lowercase"] = "do_lower_case: a Lowercase normalizer in front, as sentence-transformers adds it"
    own = folder / "tokenizer.json"
    why = f"{folder} has no tokenizer.json"
    if own.is_file():
        if src.lowercase:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(own))
            lowercase_as_sentence_transformers(tok)
            dest.write_text(tok.to_str(), encoding="utf-8")
        else:
            shutil.copyfile(own, dest)
        diff = first_difference(dest, texts, expected, src.max_length)
        if diff is None:
            return {"from": "tokenizer.json", **record}
        i, ids = diff
        why = (f"the folder's tokenizer.json gives other ids than transformers for text {i} of the probes "
               f"({texts[i][:60]!r}: {ids[:12]} against {list(expected[i])[:12]})")
    dest.write_text(rebuilt, encoding="utf-8")
    diff = first_difference(dest, texts, expected, src.max_length)
    if diff is not None:
        i, ids = diff
        raise ValueError(f"{folder}: no tokenizer.json tokenizes as transformers' {type(hf).__name__} does "
                         f"({why}; its own pipeline, saved, gives {ids[:12]} against {list(expected[i])[:12]} "
                         f"for {texts[i][:60]!r})")
    return {"from": "transformers", "why": why, **record}

"""Tiny random-weight BERT models with sentence-transformers prompts, built and exported once per process.

Two sentence-transformers folders over one tiny BERT (tests/export/tiny_models.py), each with a
config_sentence_transformers.json in the format sentence-transformers saves:
  - "default": mean pooling + Normalize, prompts with a default prompt ("query"), include_prompt=true;
  - "excluded": every pooling mode concatenated (cls, mean, max, weightedmean, lasttoken,
    mean_sqrt_len), no Normalize (so each mode shows on its own), include_prompt=false, no default.
Used by tests/runtime/test_prompts.py, tests/serve/test_serve_prompts.py and the CLI tests.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from tiny_models import HIDDEN, build_st_folder, build_transformers_folder  # noqa: E402

PROMPTS = {
    "query": "query: ",
    "document": "passage: ",
    "instruct": "Represent this sentence for searching relevant passages: ",
    "empty": "",
}
EXCLUDED_MODES = ["cls", "mean", "max", "weightedmean", "lasttoken", "mean_sqrt_len_tokens"]
MODELS = {
    "default": {"pooling": ["mean"], "normalize": True, "include_prompt": True, "default_prompt_name": "query"},
    "excluded": {"pooling": EXCLUDED_MODES, "normalize": False, "include_prompt": False,
                 "default_prompt_name": None},
}

_built: dict[str, tuple[Path, Path]] = {}


def _root() -> Path:
    if "root" not in _built:
        root = Path(tempfile.mkdtemp(prefix="stableembed-prompts-"))
        atexit.register(shutil.rmtree, root, True)
        _built["root"] = (root, root)
    return _built["root"][0]


def prompted_model(name: str) -> tuple[Path, Path]:
    """(sentence-transformers folder, exported artifact) of the model `name` in MODELS."""
    if name not in _built:
        from stableembed import export_model

        spec = MODELS[name]
        root = _root()
        hf = root / "hf-bert"
        if not (hf / "config.json").is_file():
            build_transformers_folder("bert", hf)
        pooling = {"embedding_dimension": HIDDEN, "pooling_mode": spec["pooling"],
                   "include_prompt": spec["include_prompt"]}
        src = build_st_folder(hf, root / f"src-{name}", pooling, normalize=spec["normalize"])
        (src / "config_sentence_transformers.json").write_text(json.dumps({
            "model_type": "SentenceTransformer", "__version__": {"sentence_transformers": "6.2.0"},
            "prompts": PROMPTS, "default_prompt_name": spec["default_prompt_name"],
            "similarity_fn_name": "cosine"}, indent=2), encoding="utf-8")
        out = root / f"art-{name}"
        # parity recorded for the model with a default prompt: both sides apply it (test_prompts checks it)
        export_model(src, out, parity=spec["default_prompt_name"] is not None)
        _built[name] = (src, out)
    return _built[name]

"""The artifact's tokenizer gives the ids transformers (and so sentence-transformers) gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

from stableembed import Encoder, export_model
from stableembed.export import tokenizer as tokenizer_mod
from stableembed.export.parity import PARITY_TOLERANCE
from stableembed.export.source import read_source
from stableembed.runtime.manifest import load_manifest
from stableembed.runtime.tokenize import TextTokenizer
from tiny_models import build_st_folder


def _runtime_ids(artifact: Path, texts: list[str]) -> list[list[int]]:
    return [list(e.ids) for e in TextTokenizer(load_manifest(artifact)).encode(texts)]


def _hf_ids(folder: Path, texts: list[str], max_length: int, **kwargs) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    return [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def test_the_folders_own_tokenizer_is_shipped_when_it_agrees(minilm_artifact: Path, minilm_dir: Path) -> None:
    record = load_manifest(minilm_artifact).raw["tokenizer"]
    assert record["from"] == "tokenizer.json" and record["checked_texts"] > 50
    source = read_source(minilm_dir).transformer_path / "tokenizer.json"
    assert (minilm_artifact / "tokenizer.json").read_bytes() == source.read_bytes()


def test_a_tokenizer_json_that_transformers_rebuilds_is_replaced(tiny_zoo, tmp_path: Path) -> None:
    # tokenizer.json lowercases, tokenizer_config.json says do_lower_case=false: transformers' BertTokenizer
    # rebuilds the normalizer without lowercasing, so the file as written is not what sentence-transformers runs.
    hf = tmp_path / "hf"
    shutil.copytree(tiny_zoo.transformers("bert"), hf)
    cfg_file = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg.get("do_lower_case") is True
    cfg_file.write_text(json.dumps({**cfg, "do_lower_case": False}))
    folder = build_st_folder(hf, tmp_path / "st", ["mean"], (), True)
    out = tmp_path / "art"
    export_model(folder, out, max_length=64, cpu_graph=False)
    manifest = load_manifest(out)
    assert manifest.raw["tokenizer"]["from"] == "transformers"
    assert "gives other ids" in manifest.raw["tokenizer"]["why"]
    texts = ["Mixed Case Text, Here", "UPPER lower", "plain words"]
    expected = _hf_ids(hf, texts, 64)
    assert _runtime_ids(out, texts) == expected
    assert expected != _hf_ids(tiny_zoo.transformers("bert"), texts, 64)  # the case really matters here
    assert PARITY_TOLERANCE.accepts(manifest.raw["parity"]), manifest.raw["parity"]


def test_sentence_bert_config_tokenizer_arguments_are_applied(tiny_zoo, tmp_path: Path) -> None:
    # sentence-transformers passes processor_kwargs (tokenizer_args before v6) to AutoTokenizer
    hf = tiny_zoo.transformers("bert")
    folder = build_st_folder(hf, tmp_path / "st", ["mean"], (), True)
    st_cfg = folder / "sentence_bert_config.json"
    st_cfg.write_text(json.dumps({**json.loads(st_cfg.read_text()), "tokenizer_args": {"do_lower_case": False}}))
    assert read_source(folder).tokenizer_kwargs == {"do_lower_case": False}
    out = tmp_path / "art"
    export_model(folder, out, max_length=64, cpu_graph=False)
    texts = ["Mixed Case Text, Here", "UPPER lower"]
    assert load_manifest(out).raw["tokenizer"]["from"] == "transformers"
    assert _runtime_ids(out, texts) == _hf_ids(hf, texts, 64, do_lower_case=False)
    assert PARITY_TOLERANCE.accepts(load_manifest(out).raw["parity"])
    emb = Encoder(out).encode(texts)
    assert not np.array_equal(emb[0].view(np.uint32), Encoder(out).encode([texts[0].lower()])[0].view(np.uint32))


def test_a_tokenizer_from_elsewhere_is_refused(tiny_zoo, tmp_path: Path) -> None:
    folder = build_st_folder(tiny_zoo.transformers("bert"), tmp_path / "st", ["mean"], (), False)
    st_cfg = folder / "sentence_bert_config.json"
    st_cfg.write_text(json.dumps({**json.loads(st_cfg.read_text()), "tokenizer_name_or_path": "org/other"}))
    with pytest.raises(ValueError, match="tokenizer_name_or_path='org/other' is not supported"):
        read_source(folder)


def test_no_agreeing_tokenizer_fails_the_export_and_names_the_text(tiny_zoo, tmp_path: Path, monkeypatch) -> None:
    real = tokenizer_mod.first_difference
    # both candidates disagree on the third probe text (as a tokenizer with Python-side preprocessing would)
    monkeypatch.setattr(tokenizer_mod, "first_difference",
                        lambda path, texts, expected, n: (2, [7, 7]) if real(path, texts, expected, n) is None else None)
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=r"no tokenizer\.json tokenizes as transformers' BertTokenizer.*\[7, 7\]"):
        export_model(tiny_zoo.transformers("bert"), out, max_length=64, cpu_graph=False, parity=False)
    assert not out.exists()


def test_probe_texts_are_lowercased_for_a_lowercasing_model() -> None:
    assert all(t == t.lower() for t in tokenizer_mod.probe_texts(True))
    assert any(t != t.lower() for t in tokenizer_mod.probe_texts(False))
    with_prompts = tokenizer_mod.probe_texts(False, ["Instruct: find it\nQuery: ", ""])
    assert len(with_prompts) == len(tokenizer_mod.probe_texts(False)) + 1
    assert with_prompts[-1].startswith("Instruct: find it\nQuery: ")

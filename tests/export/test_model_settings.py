"""Export reads a model's settings as sentence-transformers 6 reads them, refuses those it cannot serve, and
fails when its parity with sentence-transformers is outside the stated tolerance.

Tiny random-weight models (tiny_models.py); each test edits one setting of a model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stableembed import export_model
from stableembed.cli import main
from stableembed.export import parity as parity_mod
from stableembed.export.parity import PARITY_TOLERANCE, reference_embeddings
from stableembed.export.source import read_source
from stableembed.export.tokenizer import write_tokenizer
from stableembed.runtime.manifest import load_manifest
from stableembed.runtime.tokenize import TextTokenizer
from tiny_models import build_st_folder, corpus

LONG = " ".join(corpus()[:60])  # far beyond every length below


def _st_folder(tiny_zoo, tmp_path: Path, arch: str = "distilbert", **kwargs) -> Path:
    return build_st_folder(tiny_zoo.transformers(arch), tmp_path / "st", ("mean",), normalize=True, **kwargs)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


def _st_tokens(folder: Path, text: str) -> list[int]:
    """The ids sentence-transformers 6 feeds its model for `text` (its own truncation included)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    return model.tokenize([text])["input_ids"][0].tolist()


def _legacy_name(folder: Path) -> None:
    (folder / "sentence_bert_config.json").rename(folder / "sentence_distilbert_config.json")


SETTINGS = {
    # sentence-transformers 6 tries legacy file names when sentence_bert_config.json is absent
    "legacy file name": (dict(max_seq_length=32), _legacy_name),
    # processor_kwargs' model_max_length wins over max_seq_length
    "processor_kwargs": (dict(max_seq_length=100), lambda f: _edit_json(
        f / "sentence_bert_config.json", processor_kwargs={"model_max_length": 40})),
    # tokenizer_args (the legacy name) replaces processor_kwargs
    "tokenizer_args": (dict(max_seq_length=100), lambda f: _edit_json(
        f / "sentence_bert_config.json", tokenizer_args={"model_max_length": 24},
        processor_kwargs={"model_max_length": 50})),
    # processing_kwargs' max_length is given to every tokenizer call; "common" wins over "text"
    "processing_kwargs text": (dict(max_seq_length=100), lambda f: _edit_json(
        f / "sentence_bert_config.json", processing_kwargs={"text": {"max_length": 20}})),
    "processing_kwargs common": (dict(max_seq_length=100), lambda f: _edit_json(
        f / "sentence_bert_config.json", processing_kwargs={"text": {"max_length": 20}, "common": {"max_length": 28}})),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_max_length_is_the_one_sentence_transformers_truncates_at(name, tiny_zoo, tmp_path: Path) -> None:
    st_kwargs, edit = SETTINGS[name]
    folder = _st_folder(tiny_zoo, tmp_path, **st_kwargs)
    edit(folder)
    st_length = len(_st_tokens(folder, LONG))
    assert st_length < 100  # the setting under test is what truncates, not max_seq_length
    assert read_source(folder).max_length == st_length


def test_exported_max_length_passes_parity(tiny_zoo, tmp_path: Path) -> None:
    folder = _st_folder(tiny_zoo, tmp_path, max_seq_length=100)
    SETTINGS["processing_kwargs text"][1](folder)
    out = tmp_path / "art"
    manifest = export_model(folder, out, cpu_graph=False)
    assert manifest.max_length == 20 and manifest.raw["max_length_source"] == "model"
    assert [e.ids for e in TextTokenizer(manifest).encode([LONG])] == [_st_tokens(folder, LONG)]


def test_parity_checks_the_reference_length_instead_of_imposing_it(tiny_zoo, tmp_path: Path, monkeypatch) -> None:
    folder = _st_folder(tiny_zoo, tmp_path, max_seq_length=48)
    texts = [LONG, "short"]
    with pytest.raises(ValueError, match="truncates .* at 48 tokens, the artifact's manifest says max_length 30"):
        reference_embeddings(folder, texts, 30)
    chosen, _ = reference_embeddings(folder, texts, 30, set_max_length=True)  # the user chose 30: imposed
    own, _ = reference_embeddings(folder, texts, 48)
    assert not np.allclose(chosen[0], own[0], atol=1e-3) and np.allclose(chosen[1], own[1], atol=1e-6)
    # the export's own parity: a max_length it misread fails the export, naming both lengths
    import stableembed.export as export_pkg

    real = export_pkg.read_source

    def misread(path):
        src = real(path)
        src.max_length = 30
        return src

    monkeypatch.setattr(export_pkg, "read_source", misread)
    with pytest.raises(ValueError, match="at 48 tokens, the artifact's manifest says max_length 30"):
        export_model(folder, tmp_path / "art", cpu_graph=False)
    monkeypatch.undo()
    assert not (tmp_path / "art").exists()
    export_model(folder, tmp_path / "chosen", max_length=30, cpu_graph=False)  # explicit: no mismatch to report
    assert load_manifest(tmp_path / "chosen").raw["max_length_source"] == "argument"


def _bad_reference(monkeypatch, scale: float) -> None:
    real = parity_mod.reference_embeddings

    def shifted(*args, **kwargs):
        emb, name = real(*args, **kwargs)
        return emb + np.float32(scale) * np.sign(emb), name

    monkeypatch.setattr(parity_mod, "reference_embeddings", shifted)


def test_export_fails_outside_the_parity_tolerance(tiny_zoo, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = _st_folder(tiny_zoo, tmp_path)
    _bad_reference(monkeypatch, 1e-3)
    pattern = (r"parity with sentence-transformers .* failed for the artifact: min cosine [0-9.]+, max \|diff\| "
               r"1\.\d+e-03 on \d+ sample texts, outside PARITY_TOLERANCE \(min cosine 0.99999, max \|diff\| 1e-05\)")
    with pytest.raises(ValueError, match=pattern):
        export_model(folder, tmp_path / "art", cpu_graph=False)
    assert not (tmp_path / "art").exists()
    assert main(["export", str(folder), str(tmp_path / "cli"), "--no-cpu-graph"]) == 2
    assert "outside PARITY_TOLERANCE" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    export_model(folder, tmp_path / "unchecked", parity=False, cpu_graph=False)  # asked for no check: none made


def test_int8_holds_its_float32_graph_to_the_tolerance_not_itself(tiny_zoo, tmp_path: Path, monkeypatch) -> None:
    folder = _st_folder(tiny_zoo, tmp_path, arch="bert")
    with monkeypatch.context() as patch:
        _bad_reference(patch, 1e-3)
        with pytest.raises(ValueError, match="failed for the float32 graph, before int8 quantization"):
            export_model(folder, tmp_path / "bad", precision="int8")
    assert not (tmp_path / "bad").exists()
    manifest = export_model(folder, tmp_path / "int8", precision="int8")
    parity = manifest.raw["parity"]
    assert PARITY_TOLERANCE.accepts(parity["fp32_before_int8"]), parity
    assert not PARITY_TOLERANCE.accepts(parity), parity  # int8 itself is outside the fp32 bars, and exported


def test_normalize_before_dense_is_refused(tiny_zoo, tmp_path: Path) -> None:
    folder = build_st_folder(tiny_zoo.transformers("distilbert"), tmp_path / "st", ("mean",), ((24, "Tanh"),), True)
    modules = json.loads((folder / "modules.json").read_text())
    modules[2], modules[3] = modules[3], modules[2]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules\.json: a Dense module follows Normalize \(order: Transformer, "
                                         r"Pooling, Normalize, Dense\)"):
        read_source(folder)


def test_the_reference_runs_in_float32_for_a_bf16_checkpoint(tiny_zoo, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel

    hf = tmp_path / "hf"
    shutil.copytree(tiny_zoo.transformers("bert"), hf)
    AutoModel.from_pretrained(str(hf)).to(torch.bfloat16).save_pretrained(hf)
    folder = build_st_folder(hf, tmp_path / "st", ("mean",), normalize=True)
    manifest = export_model(folder, tmp_path / "art", cpu_graph=False)  # would fail against a bf16 reference
    assert PARITY_TOLERANCE.accepts(manifest.raw["parity"]), manifest.raw["parity"]
    assert "float32" in manifest.raw["parity"]["reference"]


def test_left_truncation_is_refused(tiny_zoo, tmp_path: Path) -> None:
    folder = _st_folder(tiny_zoo, tmp_path)
    _edit_json(folder / "tokenizer_config.json", truncation_side="left")
    with pytest.raises(ValueError, match="truncation_side 'left' .* is not supported"):
        write_tokenizer(read_source(folder), tmp_path / "tokenizer.json")


def test_the_models_truncate_dim_is_the_encoders_default(tiny_zoo, tmp_path: Path) -> None:
    """config_sentence_transformers.json's truncate_dim: sentence-transformers' encode returns that many
    components; the artifact records it (format version 4, which older readers refuse rather than return
    the full width), parity passes against that output, and the Encoder returns it by default."""
    from sentence_transformers import SentenceTransformer

    from stableembed import Encoder
    from stableembed.runtime.verify import same_bits

    folder = _st_folder(tiny_zoo, tmp_path)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"truncate_dim": 16}))
    m = export_model(folder, tmp_path / "art")  # parity on: against ST's 16 components
    assert m.truncate_dim == 16 and m.raw["format_version"] == 4 and m.dim > 16
    texts = corpus()[:6]
    enc = Encoder(tmp_path / "art")
    ours = enc.encode(texts)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(texts), 16) and enc.dim == 16
    assert np.abs(ours - ref).max() <= PARITY_TOLERANCE.max_abs_diff
    full = Encoder(tmp_path / "art", truncate_dim=m.dim).encode(texts)
    assert full.shape == (len(texts), m.dim) and same_bits(full[:, :16], ours).all()
    _edit_json(folder / "config_sentence_transformers.json", truncate_dim=m.dim + 1)
    with pytest.raises(ValueError, match=f"truncate_dim must be an int from 1 to {m.dim}"):
        export_model(folder, tmp_path / "art2")


@pytest.mark.parametrize("arch, texts", [
    ("roberta", ["ΟΔΟΣ ΑΘΗΝΑΣ", "ΚΑΛΗΜΕΡΑ ΚΟΣΜΕ", "Hello World"]),  # str.lower() makes a final sigma ς, not σ
    ("bert", ["first part [SEP] second part", "[CLS] [MASK] token"]),  # str.lower() unmakes special tokens
])
def test_do_lower_case_tokenizes_as_sentence_transformers(arch, texts, tiny_zoo, tmp_path: Path) -> None:
    folder = _st_folder(tiny_zoo, tmp_path, arch=arch)
    _edit_json(folder / "sentence_bert_config.json", do_lower_case=True)
    manifest = export_model(folder, tmp_path / "art", cpu_graph=False)
    ours = [e.ids for e in TextTokenizer(manifest).encode(texts)]
    assert ours == [_st_tokens(folder, t) for t in texts]
    assert manifest.lowercase is False and "Lowercase" in manifest.raw["tokenizer"]["lowercase"]
    assert ours != [e.ids for e in TextTokenizer(manifest).encode([t.lower() for t in texts])]  # case mattered

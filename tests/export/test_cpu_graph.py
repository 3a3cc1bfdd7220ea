"""The fused CPU graph (export/cpu_graph.py): written for BERT-style fp32 encoders, run by the CPU provider
only, storing no weight twice, checked at export, and left out (with the reason in the manifest) wherever
it is not complete, not requested or fails its check. The bit-stability and parity tests of the real model
and the tiny BERT cases run through it (tests/runtime/test_stability.py, tests/export/test_architectures.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from stableembed import Encoder, export_model
from stableembed.export import cpu_graph
from stableembed.runtime.manifest import CPU_MODEL, CPU_WEIGHTS, MODEL, WEIGHTS, ArtifactError, load_manifest
from stableembed.runtime.verify import same_bits

from tiny_models import ARCHS, Case

BERT = Case(id="cpu-graph", arch="bert", pooling=("mean",), normalize=True)


def _external_tensors(path: Path) -> dict[str, list[bytes]]:
    """file name -> the bytes of every tensor the graph at `path` reads from it."""
    graph = onnx.load(str(path), load_external_data=False)
    out: dict[str, list[bytes]] = {}
    for t in graph.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            with open(path.parent / info["location"], "rb") as f:
                f.seek(int(info["offset"]))
                out.setdefault(info["location"], []).append(f.read(int(info["length"])))
    return out


def test_real_model_gets_a_complete_fused_graph(minilm_artifact: Path) -> None:
    m = load_manifest(minilm_artifact)
    c = m.raw["cpu_graph"]
    assert m.raw["format_version"] == 3 and m.cpu_model_file == minilm_artifact / CPU_MODEL
    assert c["operators"] == {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12,
                              "BiasGelu": 6}
    assert {CPU_MODEL, CPU_WEIGHTS} <= set(m.raw["files"])
    check = c["check"]
    assert check["alone_vs_batched_bit_identical"] == check["texts"] >= 50
    assert 0 < check["max_abs_diff_to_model_onnx"] <= cpu_graph.FUSED_TOLERANCE[0]
    graph = onnx.load(str(minilm_artifact / CPU_MODEL), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Softmax", "LayerNormalization", "Erf"}  # nothing of the transformer left unfused
    assert "stableembed/" in "".join(n.name for n in graph.graph.node)  # our pooling head is spliced on


def test_no_weight_is_stored_twice(minilm_artifact: Path) -> None:
    m = load_manifest(minilm_artifact)
    reads = _external_tensors(minilm_artifact / CPU_MODEL)
    standard = {hashlib.sha256(b).digest() for b in _external_tensors(minilm_artifact / MODEL)[WEIGHTS]}
    own = reads[CPU_WEIGHTS]
    # its own file holds only what fusion made new (6 concatenated QKV weights and their biases) ...
    assert len(own) == 12 and not {hashlib.sha256(b).digest() for b in own} & standard
    assert sum(len(b) for b in own) <= (minilm_artifact / CPU_WEIGHTS).stat().st_size < 0.15 * m.raw["weights"]["bytes"]
    # ... everything else is read from model.onnx.data, where the standard graph reads it
    assert len(reads[WEIGHTS]) == m.raw["cpu_graph"]["weights"]["shared"]["tensors"] >= 60
    assert {hashlib.sha256(b).digest() for b in reads[WEIGHTS]} <= standard


def test_cpu_provider_runs_the_fused_graph(minilm_artifact: Path, tmp_path: Path, real_texts: list[str],
                                          capsys: pytest.CaptureFixture) -> None:
    """The CPU backend loads model.cpu.onnx (and `verify` names it); an artifact exported without it runs
    model.onnx, and the two agree within the export's tolerance (bit-identity is promised per graph)."""
    from stableembed.cli import main

    enc = Encoder(minilm_artifact)
    assert enc.backend.model_file == minilm_artifact / CPU_MODEL
    assert main(["verify", str(minilm_artifact), "one text", "another one", "--no-subprocess"]) == 0
    assert f"provider cpu ({CPU_MODEL})" in capsys.readouterr().out
    copy = tmp_path / "standard"
    shutil.copytree(minilm_artifact, copy)
    raw = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    raw["cpu_graph"] = {"file": None, "reason": "removed by the test"}
    for name in (CPU_MODEL, CPU_WEIGHTS):
        (copy / name).unlink()
        del raw["files"][name]
    (copy / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    plain = Encoder(copy)
    assert plain.backend.model_file == copy / MODEL
    a, b = enc.encode(real_texts), plain.encode(real_texts)
    atol, rtol = cpu_graph.FUSED_TOLERANCE
    assert np.allclose(a, b, atol=atol, rtol=rtol) and np.abs(a).max() > 0.01


def test_fused_graph_files_are_checked(minilm_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(minilm_artifact, copy)
    data = bytearray((copy / CPU_WEIGHTS).read_bytes())
    data[len(data) // 3] ^= 1
    (copy / CPU_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{CPU_WEIGHTS} does not match its sha256"):
        Encoder(copy)
    raw = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    del raw["files"][CPU_MODEL]
    (copy / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ArtifactError, match=f"lists no {CPU_MODEL}"):
        Encoder(copy)


def test_not_requested_and_int8_run_model_onnx(tiny_zoo, tmp_path: Path) -> None:
    src = tiny_zoo.source(BERT)
    for kwargs, reason in (({"cpu_graph": False}, "not requested"), ({"precision": "int8"}, "int8 artifacts")):
        out = tmp_path / reason.replace(" ", "-")
        m = export_model(src, out, parity=False, **kwargs)
        assert m.cpu_model_file is None and reason in m.raw["cpu_graph"]["reason"]
        assert m.raw["format_version"] == 2 and not (out / CPU_MODEL).exists() and not (out / CPU_WEIGHTS).exists()
        assert Encoder(out).backend.model_file == out / MODEL


def test_a_failed_check_leaves_the_graph_out(tiny_zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tolerance at all: the fused kernels sum in another order than model.onnx, so the check fails and the
    export goes on without the graph, saying why."""
    monkeypatch.setattr(cpu_graph, "FUSED_TOLERANCE", (0.0, 0.0))
    out = tmp_path / "art"
    m = export_model(tiny_zoo.source(BERT), out, parity=False)
    c = m.raw["cpu_graph"]
    assert c["file"] is None and "differs from model.onnx by up to" in c["reason"], c
    assert c["check"]["alone_vs_batched_bit_identical"] == c["check"]["texts"]  # batch invariance itself held
    assert not (out / CPU_MODEL).exists() and not (out / CPU_WEIGHTS).exists() and CPU_MODEL not in m.raw["files"]
    assert Encoder(out).backend.model_file == out / MODEL


def _family_artifact(tiny_zoo, arch: str) -> Path:
    """The family's tiny model with its published head: the artifact test_architectures.py checks for
    parity and bit stability (same case, so the session's zoo exports it once)."""
    a = ARCHS[arch]
    case = Case(f"{arch}-{'+'.join(a.pooling)}{'-dense' if a.dense else ''}-normalize", arch=arch,
                pooling=a.pooling, dense=a.dense, normalize=True)
    return tiny_zoo.artifact(case)[0]


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
def test_bert_style_families_are_fused(arch: str, tiny_zoo) -> None:
    art = _family_artifact(tiny_zoo, arch)
    m = load_manifest(art)
    c = m.raw["cpu_graph"]
    assert m.cpu_model_file == art / CPU_MODEL, c
    layers = m.raw["architecture"]["layers"]
    assert (c["operators"]["Attention"], c["operators"]["SkipLayerNormalization"], c["operators"]["BiasGelu"]) == \
        (layers, 2 * layers, layers)
    # RoBERTa's embeddings (position ids counted from the padding id) keep a plain LayerNormalization
    assert c["operators"]["EmbedLayerNormalization"] == (0 if arch in ("roberta", "xlm-roberta") else 1)
    assert c["check"]["alone_vs_batched_bit_identical"] == c["check"]["texts"]
    assert Encoder(art, check_hashes=False).backend.model_file == art / CPU_MODEL


@pytest.mark.parametrize("arch,family", [("mpnet", "MPNet"), ("modernbert", "ModernBERT"), ("qwen3", "Qwen3")])
def test_other_families_say_why(arch: str, family: str, tiny_zoo) -> None:
    art = _family_artifact(tiny_zoo, arch)
    c = load_manifest(art, check_hashes=False).raw["cpu_graph"]
    assert c == {"file": None, "reason": f"no fused operators for the {family} family"}
    assert Encoder(art, check_hashes=False).backend.model_file == art / MODEL


def test_tiny_bert_is_fused_and_bit_stable(tiny_zoo, real_texts: list[str]) -> None:
    """A 2-layer, 4-head BERT fuses completely too, and each text's bits do not depend on its batch."""
    art, _ = tiny_zoo.artifact(BERT)
    m = load_manifest(art)
    assert m.cpu_model_file is not None, m.raw["cpu_graph"]
    enc = Encoder(art, threads=2)
    alone = np.stack([enc.encode(t) for t in real_texts[:40]])
    batched = enc.encode(real_texts[:40][::-1], batch_size=16)[::-1]
    assert same_bits(alone, batched).all()


def test_a_batch_dependent_graph_is_refused(tiny_zoo, tmp_path: Path) -> None:
    """The export's check on a CPU graph whose rows depend on their batch (each output plus a millionth of
    the batch's sum): refused as not batch-invariant, its files removed."""
    from onnx import helper

    out = tmp_path / "art"
    export_model(tiny_zoo.source(BERT), out, parity=False, cpu_graph=False)
    model = onnx.load(str(out / MODEL))  # weights read in: saved below as one self-contained graph
    g = model.graph
    final = next(n for n in g.node if n.output[0] == "sentence_embedding")
    final.output[0] = "rows"
    g.initializer.append(onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "batch_axis"))
    g.initializer.append(onnx.numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "tiny"))
    g.node.extend([helper.make_node("ReduceSum", ["rows", "batch_axis"], ["batch_sum"], keepdims=1),
                   helper.make_node("Mul", ["batch_sum", "tiny"], ["leak"]),
                   helper.make_node("Add", ["rows", "leak"], ["sentence_embedding"])])
    onnx.save(model, str(out / CPU_MODEL))
    raw = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    record = cpu_graph.store_and_check(out, raw, {"file": CPU_MODEL, "operators": {}})
    assert record["file"] is None and record["reason"].startswith("fused graph not batch-invariant"), record
    assert record["check"]["alone_vs_batched_bit_identical"] < record["check"]["texts"]
    assert not (out / CPU_MODEL).exists() and not (out / CPU_WEIGHTS).exists()

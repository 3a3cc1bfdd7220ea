"""The artifact keeps its weights in one page-aligned data file beside model.onnx: listed and checked like
every file, the same bits as the self-contained form, and single-file (format 1) artifacts still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from stableembed import Encoder, export_model
from stableembed.cli import main
from stableembed.export.artifact import ALIGNMENT, EXTERNAL_MIN_BYTES, write_manifest
from stableembed.runtime.machine import cpu_info
from stableembed.runtime.manifest import MODEL, WEIGHTS, ArtifactError, load_manifest
from stableembed.runtime.verify import same_bits

from tiny_models import Case

CASE = Case(id="weights", arch="bert", pooling=("mean",), normalize=True)


@pytest.fixture(scope="module")
def art(tiny_zoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Without the fused CPU graph (tests/export/test_cpu_graph.py): the CPU provider runs model.onnx, whose
    weights these tests are about."""
    out = tmp_path_factory.mktemp("weights") / "art"
    export_model(tiny_zoo.source(CASE), out, cpu_graph=False)
    return out


def single_file_copy(art: Path, dst: Path) -> Path:
    """The same graph and weights as one model.onnx with a format-1 manifest: how artifacts were written
    before external weights."""
    shutil.copytree(art, dst)
    model = onnx.load(str(dst / MODEL))  # reads the weights in and clears the external references
    (dst / WEIGHTS).unlink()
    onnx.save_model(model, str(dst / MODEL))
    raw = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    del raw["weights"]
    raw["format_version"] = 1
    write_manifest(dst, raw)
    return dst


def test_weights_file_is_listed_aligned_and_complete(art: Path) -> None:
    m = load_manifest(art)
    raw = m.raw
    assert raw["format_version"] == 2  # 3 only with a CPU graph, 4 with a truncate_dim
    assert set(raw["files"]) == {MODEL, WEIGHTS, "tokenizer.json"}
    assert m.weights_file == art / WEIGHTS
    w = raw["weights"]
    data = (art / WEIGHTS).stat().st_size
    assert w["file"] == WEIGHTS and w["bytes"] == data == raw["files"][WEIGHTS]["bytes"]
    graph = onnx.load(str(art / MODEL), load_external_data=False)
    external, inline, end = 0, 0, 0
    for t in graph.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info["offset"]), int(info["length"])
            assert info["location"] == WEIGHTS and offset % ALIGNMENT == 0, (t.name, info)
            assert offset >= end  # no overlap
            end = offset + length
            external += 1
        else:
            assert len(t.raw_data) < EXTERNAL_MIN_BYTES, t.name
            inline += 1
    assert external == w["tensors"] >= 10 and end == data
    # readable by whoever can read the graph (onnx creates the data file 0600)
    assert (art / WEIGHTS).stat().st_mode & 0o777 == (art / MODEL).stat().st_mode & 0o777
    # onnx.load (TensorRT preparation, int8 rewriting) still sees every weight
    full = onnx.load(str(art / MODEL))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in full.graph.initializer)


def test_same_bits_as_the_single_file_form(art: Path, tmp_path: Path, real_texts: list[str]) -> None:
    single = single_file_copy(art, tmp_path / "single")
    assert load_manifest(single).weights_file is None  # format 1 artifacts still load
    assert len(real_texts) >= 96
    for mode in ("dynamic", "fixed"):
        a = Encoder(art, mode=mode).encode(real_texts, batch_size=16)
        b = Encoder(single, mode=mode).encode(real_texts, batch_size=16)
        assert same_bits(a, b).all(), f"{mode}: {int((~same_bits(a, b)).sum())} texts differ"
    # and the embeddings are those of a real model, not zeros from an unread weights file
    assert np.isfinite(a).all() and np.abs(a).max() > 0.01


def test_weights_file_is_checked_like_every_file(art: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} does not match its sha256"):
        Encoder(copy)
    with open(copy / WEIGHTS, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is damaged or truncated"):
        Encoder(copy)
    (copy / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is missing"):
        Encoder(copy)
    raw = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    del raw["files"][WEIGHTS]
    (copy / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ArtifactError, match=f"lists no {WEIGHTS}"):
        Encoder(copy)


def test_info_and_verify_name_the_machine(art: Path, capsys: pytest.CaptureFixture) -> None:
    here = cpu_info()
    raw = load_manifest(art).raw
    assert raw["exported_on"]["key"] == here["key"] and raw["exported_on"]["isa"] == here["isa"]
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert f"[{here['key']}]" in out and f"ISA level {here['isa']}" in out and "memory-mapped" in out
    assert main(["verify", str(art), "--no-subprocess"]) == 0
    out = capsys.readouterr().out
    assert f"bits computed here with: provider cpu" in out and f"ISA level {here['isa']}" in out
    # the bundled sample's bits here equal those recorded at export (same machine, same provider)
    assert f"same bits as at export on {here['key']}" in out, out

"""Loading refuses damaged, truncated, mismatched, escaping or too-new artifacts, naming the problem."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from stableembed import Encoder
from stableembed.runtime.manifest import FORMAT_VERSION, ArtifactError, load_manifest


@pytest.fixture
def copy(minilm_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(minilm_artifact, dst)
    return dst


def _edit_manifest(folder, fn):
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def test_manifest_values(minilm_artifact) -> None:
    m = load_manifest(minilm_artifact)
    assert m.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert m.pooling == ("mean",) and m.normalize and m.precision == "fp32" and m.dim == 384
    raw = m.raw
    assert raw["source"]["weights_sha256"] == {
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}
    assert set(raw["files"]) == {"model.onnx", "model.onnx.data", "model.cpu.onnx", "model.cpu.onnx.data", "tokenizer.json"}
    assert {"torch", "onnxruntime", "transformers"} <= set(raw["libraries"])


def test_flipped_byte_is_refused(copy) -> None:
    data = bytearray((copy / "tokenizer.json").read_bytes())
    data[100] ^= 1
    (copy / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="tokenizer.json does not match its sha256"):
        Encoder(copy)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_flipped_graph_byte_is_refused_as_damage(copy, where) -> None:
    """Whether onnxruntime could load the damaged graph or not, the error names the damaged file (the
    sha256s are checked before any file is opened by a loader)."""
    data = bytearray((copy / "model.onnx").read_bytes())
    data[int(len(data) * where)] ^= 0x55
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        Encoder(copy)


def test_truncated_model_is_refused(copy) -> None:
    with open(copy / "model.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match="model.onnx is damaged or truncated"):
        Encoder(copy)


def test_missing_file_and_missing_manifest(copy) -> None:
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx is missing"):
        Encoder(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Encoder(copy)


def test_newer_format_is_refused_with_the_version(copy) -> None:
    _edit_manifest(copy, lambda r: r.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        Encoder(copy)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx"])
def test_paths_cannot_escape(copy, name) -> None:
    _edit_manifest(copy, lambda r: r["files"].update({name: {"bytes": 1, "sha256": "0"}}))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        Encoder(copy)


def test_damaged_json(copy) -> None:
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="damaged"):
        Encoder(copy)


@pytest.mark.parametrize("name", ["..", "."])
def test_dot_names_cannot_escape(copy, name) -> None:
    _edit_manifest(copy, lambda r: r["files"].update({name: {"bytes": 1, "sha256": "0"}}))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        Encoder(copy)


def test_files_may_be_symlinks_their_hashes_guard_them(minilm_artifact, tmp_path) -> None:
    """A Hugging Face snapshot's files are symlinks into a blob store: an artifact laid out that way loads
    and gives the same bits; a symlink to other bytes is refused by its hash."""
    blobs, art = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    art.mkdir()
    for f in minilm_artifact.iterdir():
        shutil.copy2(f, blobs / f.name)
        (art / f.name).symlink_to(blobs / f.name)
    texts = ["a symlinked artifact", "second"]
    assert (Encoder(art).encode(texts).view("uint32") == Encoder(minilm_artifact).encode(texts).view("uint32")).all()
    (art / "tokenizer.json").unlink()
    other = blobs / "other.json"
    other.write_bytes((blobs / "tokenizer.json").read_bytes().replace(b'"', b"'", 1)[:-1] + b" ")
    (art / "tokenizer.json").symlink_to(other)
    with pytest.raises(ArtifactError, match="tokenizer.json does not match its sha256"):
        Encoder(art)


@pytest.mark.parametrize("edit, what", [
    (lambda r: r["files"]["tokenizer.json"].pop("sha256"), "bad files record"),
    (lambda r: r.update(files=list(r["files"])), "bad files record"),
    (lambda r: r.update(format_version=True), "format version True"),
    (lambda r: r.update(format_version=-7), "format version -7"),
    (lambda r: r.update(max_length=0), "max_length must be a positive int, got 0"),
    (lambda r: r.update(dim=2.5), "dim must be a positive int, got 2.5"),
])
def test_bad_fields_are_artifact_errors(copy, edit, what) -> None:
    _edit_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=re.escape(what)):
        Encoder(copy)

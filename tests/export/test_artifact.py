"""Export writes atomically and records what it did."""

from __future__ import annotations

import os
import sys

import pytest

from stableembed import export_model
from stableembed.export import artifact as artifact_mod
from stableembed.runtime.manifest import load_manifest


def test_failed_export_leaves_nothing(minilm_dir, tmp_path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(artifact_mod, "write_manifest", boom)
    import stableembed.export as export_pkg

    monkeypatch.setattr(export_pkg, "write_manifest", boom)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="half-way"):
        export_model(minilm_dir, out, parity=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(minilm_artifact, minilm_dir) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(minilm_dir, minilm_artifact)


def test_options_are_recorded(minilm_dir, tmp_path) -> None:
    out = tmp_path / "short"
    export_model(minilm_dir, out, max_length=64, buckets=[[4, 32], [2, 64]], parity=False)
    m = load_manifest(out)
    assert m.max_length == 64 and m.fixed_buckets == ((4, 32), (2, 64)) and "parity" not in m.raw
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0700
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no manifest temp left
    with pytest.raises(ValueError, match=r"buckets must include the length max_length \(64\)"):
        export_model(minilm_dir, tmp_path / "bad", max_length=64, buckets=[[4, 32]], parity=False)
    # the pooling trees are built max_length deep: a longer bucket would fail at its first batch
    with pytest.raises(ValueError, match=r"bucket length 512 is beyond max_length \(256\)"):
        export_model(minilm_dir, tmp_path / "bad", buckets=[[8, 64], [8, 512]], parity=False)
    # all-MiniLM-L6-v2 has 512 learned positions
    with pytest.raises(ValueError, match=r"max_length 1024 is beyond the 512 positions .*max_length \(--max-length\) <= 512"):
        export_model(minilm_dir, tmp_path / "bad", max_length=1024, parity=False)
    with pytest.raises(ValueError, match="precision"):
        export_model(minilm_dir, tmp_path / "bad", precision="fp8")
    assert not (tmp_path / "bad").exists()


def test_a_sharded_checkpoint_is_hashed_shard_by_shard(tmp_path) -> None:
    from transformers import AutoModel

    from stableembed.export.source import read_source
    from tiny_models import build_transformers_folder

    src = build_transformers_folder("bert", tmp_path / "single")
    sharded = tmp_path / "sharded"
    AutoModel.from_pretrained(src).save_pretrained(sharded, max_shard_size="20KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            (sharded / f.name).write_bytes(f.read_bytes())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    hashes = read_source(sharded).weight_hashes()
    assert sorted(hashes) == sorted(["model.safetensors.index.json", *shards])
    (sharded / shards[-1]).unlink()
    with pytest.raises(ValueError, match=f"names shard files that are not there: {shards[-1]}"):
        read_source(sharded).weight_hashes()


def _old_artifact(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text("old", encoding="utf-8")
    (out / "only-in-old.bin").write_bytes(b"x")
    return out


def _siblings(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_overwrite_is_one_exchange(tmp_path, monkeypatch) -> None:
    """Replacing an artifact swaps the folders in one step: no rename leaves `out` missing for a moment."""
    out = _old_artifact(tmp_path)

    def no_rename(*args):
        raise AssertionError("os.replace called: two renames instead of one exchange")

    monkeypatch.setattr(artifact_mod.os, "replace", no_rename)
    with artifact_mod.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new", encoding="utf-8")
    assert (out / "manifest.json").read_text(encoding="utf-8") == "new"
    assert not (out / "only-in-old.bin").exists() and _siblings(tmp_path) == ["art"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_exchange_swaps_two_paths(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("file b", encoding="utf-8")
    assert artifact_mod.exchange(a, b)
    assert a.read_text(encoding="utf-8") == "file b" and b.is_dir()
    with pytest.raises(FileNotFoundError):
        artifact_mod.exchange(tmp_path / "missing", b)


def test_overwrite_without_an_exchange_takes_two_renames_and_undoes_a_failed_second(tmp_path, monkeypatch) -> None:
    out = _old_artifact(tmp_path)
    monkeypatch.setattr(artifact_mod, "exchange", lambda a, b: False)  # a system without the call
    real, calls = artifact_mod.os.replace, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(artifact_mod.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"):
        with artifact_mod.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new", encoding="utf-8")
    assert (out / "manifest.json").read_text(encoding="utf-8") == "old" and _siblings(tmp_path) == ["art"]
    monkeypatch.setattr(artifact_mod.os, "replace", real)
    with artifact_mod.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text("new", encoding="utf-8")
    assert (out / "manifest.json").read_text(encoding="utf-8") == "new" and _siblings(tmp_path) == ["art"]


def test_overwrite_refuses_a_folder_that_is_not_an_artifact(tmp_path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work", encoding="utf-8")
    with pytest.raises(FileExistsError, match="is not an artifact .*refusing to replace it"):
        with artifact_mod.atomic_folder(precious, overwrite=True):
            pass
    assert (precious / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    assert _siblings(tmp_path) == ["home"]

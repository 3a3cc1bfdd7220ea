"""Hash stamps: an unchanged large file is not re-read on the next load, any change is still caught, and
an unusable cache only costs a hash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from stableembed import Encoder
from stableembed.runtime import manifest as manifest_mod
from stableembed.runtime import stamps
from stableembed.runtime.manifest import CPU_MODEL, CPU_WEIGHTS, MODEL, ArtifactError, load_manifest

WEIGHTS = "model.onnx.data"


@pytest.fixture
def art(minilm_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy (so no stamp names it) under a cache of its own; files just copied count as settled."""
    dst = tmp_path / "art"
    shutil.copytree(minilm_artifact, dst)
    monkeypatch.setenv("STABLEEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stamps, "STAMP_MARGIN_S", -60.0)
    return dst


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files sha256_file reads, in order."""
    seen: list[str] = []
    real = manifest_mod.sha256_file

    def spy(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(manifest_mod, "sha256_file", spy)
    return seen


def test_second_load_skips_only_the_stamped_weights(art: Path, hashed: list[str]) -> None:
    assert (art / WEIGHTS).stat().st_size >= stamps.STAMP_MIN_BYTES > (art / "tokenizer.json").stat().st_size
    assert (art / CPU_WEIGHTS).stat().st_size >= stamps.STAMP_MIN_BYTES > (art / CPU_MODEL).stat().st_size
    load_manifest(art)
    assert sorted(hashed) == sorted([MODEL, CPU_MODEL, "tokenizer.json", WEIGHTS, CPU_WEIGHTS])
    hashed.clear()
    load_manifest(art)
    assert sorted(hashed) == sorted([MODEL, CPU_MODEL, "tokenizer.json"])  # small files: always re-read
    hashed.clear()
    load_manifest(art, rehash=True)
    assert WEIGHTS in hashed and CPU_WEIGHTS in hashed


@pytest.mark.parametrize("change", ["same-size byte flip", "touch", "replaced by a copy"])
def test_a_changed_file_is_read_again(art: Path, hashed: list[str], change: str) -> None:
    load_manifest(art)
    path = art / WEIGHTS
    if change == "same-size byte flip":
        with open(path, "r+b") as f:  # size and (here) even mtime kept: the ctime still moves
            st = os.fstat(f.fileno())
            f.seek(4096)
            b = f.read(1)
            f.seek(4096)
            f.write(bytes([b[0] ^ 1]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(ArtifactError, match="model.onnx.data does not match its sha256"):
            Encoder(art)
        return
    if change == "touch":
        os.utime(path)
    else:
        tmp = path.with_name("w.tmp")
        shutil.copy2(path, tmp)
        os.replace(tmp, path)
    hashed.clear()
    load_manifest(art)
    assert WEIGHTS in hashed


def test_stamp_for_another_digest_or_path_is_not_trusted(art: Path, hashed: list[str]) -> None:
    load_manifest(art)
    stamped = {json.loads(p.read_text())["path"]: p
               for p in (Path(os.environ["STABLEEMBED_CACHE"]) / "verified").glob("*.json")}
    assert set(stamped) == {str((art / WEIGHTS).resolve()), str((art / CPU_WEIGHTS).resolve())}
    stamp = stamped[str((art / WEIGHTS).resolve())]
    record = json.loads(stamp.read_text())
    for key, value in (("sha256", "0" * 64), ("path", "/elsewhere/model.onnx.data")):
        stamp.write_text(json.dumps({**record, key: value}))
        hashed.clear()
        load_manifest(art)
        assert WEIGHTS in hashed
    stamp.write_text("{not json")
    hashed.clear()
    load_manifest(art)
    assert WEIGHTS in hashed


def test_recently_changed_file_is_not_stamped(art: Path, hashed: list[str], monkeypatch) -> None:
    monkeypatch.setattr(stamps, "STAMP_MARGIN_S", 3600.0)  # the copy is seconds old: inside the margin
    load_manifest(art)
    hashed.clear()
    load_manifest(art)
    assert WEIGHTS in hashed
    assert not list((Path(os.environ["STABLEEMBED_CACHE"]) / "verified").glob("*.json"))


def test_unusable_cache_still_loads_and_checks(art: Path, hashed: list[str], monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("STABLEEMBED_CACHE", str(blocker))
    for _ in range(2):
        hashed.clear()
        enc = Encoder(art)
        assert WEIGHTS in hashed
    assert enc.encode("still works").shape == (384,)


def test_verify_cli_rereads_every_file(art: Path, hashed: list[str], capsys) -> None:
    from stableembed.cli import main

    load_manifest(art)
    hashed.clear()
    assert main(["verify", str(art), "one text", "another"]) == 0
    assert WEIGHTS in hashed
    assert "all re-read" in capsys.readouterr().out


def test_stamps_of_deleted_artifacts_are_pruned(art: Path, tmp_path: Path) -> None:
    """A new stamp clears those whose file is gone (a deleted artifact), keeps the others, and drops
    unreadable ones; the cache does not grow with every artifact ever loaded."""
    verified = Path(os.environ["STABLEEMBED_CACHE"]) / "verified"
    load_manifest(art)
    first = {p.name for p in verified.glob("*.json")}
    assert len(first) == 2  # model.onnx.data and model.cpu.onnx.data
    (verified / "broken.json").write_text("{not json")
    second = tmp_path / "second"
    shutil.copytree(art, second)
    shutil.rmtree(art)
    load_manifest(second)  # stamps its own two files, then prunes
    left = {json.loads(p.read_text())["path"] for p in verified.glob("*.json")}
    assert left == {str((second / WEIGHTS).resolve()), str((second / CPU_WEIGHTS).resolve())}
    third = tmp_path / "third"
    shutil.copytree(second, third)
    load_manifest(third)
    assert len(list(verified.glob("*.json"))) == 4  # files that still exist keep their stamps

"""Export writes atomically and records what it did."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="buckets must include a length >= max_length"):
        export_model(minilm_dir, tmp_path / "bad", max_length=64, buckets=[[4, 32]], parity=False)
    with pytest.raises(ValueError, match="precision"):
        export_model(minilm_dir, tmp_path / "bad", precision="fp8")
    assert not (tmp_path / "bad").exists()

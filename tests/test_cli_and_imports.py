"""The CLI end to end on the real model, and the lean-import promise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.cli import main
from stableembed.runtime.verify import same_bits


def test_import_is_lean() -> None:
    code = ("import sys, stableembed; from stableembed import Encoder; import stableembed.runtime, "
            "stableembed.kernels; bad = [m for m in ('torch', 'transformers', 'onnx', 'sentence_transformers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_embed_info_verify(minilm_artifact, tmp_path, capsys) -> None:
    texts = ["first line", "", "ünïcödé 🚀", "a longer line of text about embeddings"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert main(["embed", str(minilm_artifact), "-i", str(src), "-o", str(tmp_path / "o.npy")]) == 0
    ref = Encoder(minilm_artifact).encode(texts)
    assert same_bits(np.load(tmp_path / "o.npy"), ref).all()
    assert main(["embed", str(minilm_artifact), "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--mode",
                 "fixed"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts
    assert same_bits(np.array([r["embedding"] for r in rows], dtype=np.float32), ref).all()
    capsys.readouterr()
    assert main(["info", str(minilm_artifact)]) == 0
    out = capsys.readouterr().out
    assert "pooling" in out and "mean" in out and "384" in out and "sha256" in out
    assert main(["verify", str(minilm_artifact), "one", "two", "three", "--no-subprocess"]) == 0
    out = capsys.readouterr().out
    assert "each of 3 texts" in out and "verdict: OK" in out and "fresh process" not in out


@pytest.mark.slow
def test_verify_on_the_bundled_sample(minilm_artifact, capsys) -> None:
    """`stableembed verify ARTIFACT`, as the README tells users to run it: the bundled sample, every
    arrangement (8 in this process, 2 fresh processes), each text bit-identical to itself alone."""
    from stableembed.data import sample_texts

    n = len(sample_texts())
    assert main(["verify", str(minilm_artifact)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "bit-identical" in line]
    assert len(lines) == 10 and sum("fresh process" in line for line in lines) == 2, out
    assert all(f" {n}/{n} bit-identical" in line for line in lines), out
    assert f"each of {n} texts" in out and out.rstrip().endswith("verdict: OK")


def test_cli_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err

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
    assert "model folder's tokenizer.json; same ids as transformers" in out
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


def _cuda_ep_missing() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP: a missing provider cannot be shown with cuda")


def test_missing_provider_is_an_error_on_every_command(minilm_artifact, capsys, monkeypatch) -> None:
    """--provider reaches the Encoder on embed, verify and serve; a provider onnxruntime lacks is an error
    that names it, with exit status 2, never a fallback to the CPU."""
    _cuda_ep_missing()
    import stableembed.serve.server as server

    def no_server(*args, **kwargs):
        raise AssertionError("serve started a server on a provider that is missing")

    monkeypatch.setattr(server, "make_server", no_server)
    art = str(minilm_artifact)
    for argv in (["embed", art, "a text", "--provider", "cuda"],
                 ["verify", art, "a text", "--no-subprocess", "--provider", "cuda"],
                 ["serve", art, "--provider", "cuda", "--port", "0"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert f"stableembed {argv[0]}: error:" in captured.err and "CUDAExecutionProvider" in captured.err, argv
        # no embedding was printed (embed: JSON arrays), no stability check ran (verify names the machine first)
        assert "[" not in captured.out if argv[0] == "embed" else "bit-identical" not in captured.out, argv
    # the installed command's own exit status
    res = subprocess.run([sys.executable, "-m", "stableembed", "embed", art, "x", "--provider", "cuda"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "CUDAExecutionProvider" in res.stderr and res.stdout == "", res
    with pytest.raises(SystemExit):
        main(["embed", art, "x", "--provider", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_embed_truncation_batch_budget_parallel_run_and_cache_options(minilm_artifact, capsys, tmp_path) -> None:
    art = str(minilm_artifact)
    long_text = "stable embeddings " * 300  # far beyond max_length (256) tokens
    assert main(["embed", art, "short", long_text]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert same_bits(np.array(rows, dtype=np.float32), Encoder(minilm_artifact).encode(["short", long_text])).all()
    assert main(["embed", art, "short", long_text, "--no-truncate"]) == 2
    captured = capsys.readouterr()
    assert "text at index 1" in captured.err and "max_length" in captured.err and captured.out == ""
    # --max-batch-tokens reaches the Encoder: a budget below one token is refused there
    assert main(["embed", art, "short", "--max-batch-tokens", "0"]) == 2
    assert "max_batch_tokens must be >= 1" in capsys.readouterr().err
    # and with a budget so small that every text runs alone, the bits stay the same
    texts = ["one", "two words", "three words here", long_text]
    assert main(["embed", art, *texts, "--max-batch-tokens", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert same_bits(np.array(rows, dtype=np.float32), Encoder(minilm_artifact).encode(texts)).all()
    # --parallel-runs reaches the Encoder too: refused below 1, and two runs at once give the same bits
    assert main(["embed", art, "short", "--parallel-runs", "0"]) == 2
    assert "parallel_runs must be >= 1" in capsys.readouterr().err
    assert main(["embed", art, *texts, "--max-batch-tokens", "1", "--parallel-runs", "2", "--threads", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert same_bits(np.array(rows, dtype=np.float32), Encoder(minilm_artifact).encode(texts)).all()
    # --cache-size reaches the Encoder: refused below 0; repeats across chunks, answered from it, same bits
    assert main(["embed", art, "short", "--cache-size", "-1"]) == 2
    assert "cache_size must be >= 0" in capsys.readouterr().err
    repeated = texts + texts[::-1]
    (tmp_path / "in.txt").write_text("\n".join(repeated) + "\n", encoding="utf-8")
    assert main(["embed", art, "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.npy"),
                 "--cache-size", "8", "--chunk-size", "2"]) == 0
    assert same_bits(np.load(tmp_path / "out.npy"), Encoder(minilm_artifact).encode(repeated)).all()


def test_export_precision_choices(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path), str(tmp_path / "out"), "--precision", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fp16'" in err and "'fp32'" in err and "'int8'" in err
    assert not (tmp_path / "out").exists()


def test_texts_may_follow_options(minilm_artifact, capsys) -> None:
    want = Encoder(minilm_artifact).encode(["what is x", "and y"])
    assert main(["embed", str(minilm_artifact), "--batch-size", "1", "what is x", "and y"]) == 0
    rows = np.array([json.loads(line) for line in capsys.readouterr().out.splitlines()], dtype=np.float32)
    assert same_bits(rows, want).all()
    assert main(["verify", str(minilm_artifact), "--no-subprocess", "hello", "world"]) == 0
    assert "each of 2 texts" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # an unknown option is still argparse's error
        main(["embed", str(minilm_artifact), "--no-such-option", "x"])
    assert exc.value.code == 2
    want = Encoder(minilm_artifact).encode(["a", "-5 degrees", "--"])
    assert main(["embed", str(minilm_artifact), "--batch-size", "2", "a", "--", "-5 degrees", "--"]) == 0
    rows = np.array([json.loads(line) for line in capsys.readouterr().out.splitlines()], dtype=np.float32)
    assert same_bits(rows, want).all()


def test_interrupt_and_closed_pipe_end_quietly(minilm_artifact, tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C: one line naming the command (and --resume where it applies), exit status 130; a reader that
    leaves the pipe (`| head`): no error, exit 0."""
    from stableembed.runtime.encoder import Encoder as RuntimeEncoder

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RuntimeEncoder, "_encode", interrupted)
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n", encoding="utf-8")
    assert main(["embed", str(minilm_artifact), "-i", str(src), "-o", str(tmp_path / "o.jsonl")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "stableembed embed: interrupted (--resume continues it)"
    monkeypatch.undo()
    code = ("import sys; from stableembed.cli import main; "
            f"sys.exit(main(['embed', {str(minilm_artifact)!r}, '-i', {str(src)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0 and "Broken pipe" not in err and "Traceback" not in err, err


def test_info_reads_what_loading_does_not_require(minilm_artifact, tmp_path, capsys) -> None:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(minilm_artifact, art)
    raw = json.loads((art / "manifest.json").read_text())
    for key in ("source", "created", "libraries", "opset", "exporter", "architecture"):
        raw.pop(key)
    (art / "manifest.json").write_text(json.dumps(raw))
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert "source" in out and "unknown" in out


def test_verify_parity_needs_a_local_folder_before_any_work(minilm_artifact, tmp_path, capsys, monkeypatch) -> None:
    import stableembed.runtime.verify as verify

    monkeypatch.setattr(verify, "check_stability", lambda *a, **k: pytest.fail("ran the checks first"))
    assert main(["verify", str(minilm_artifact), "x", "--parity", str(tmp_path / "nope")]) == 2
    assert "--parity: model folder not found" in capsys.readouterr().err

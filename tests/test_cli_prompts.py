"""`--prompt-name` / `--prompt` on `stableembed embed` and `verify`, and `info`'s prompts line, on tiny
random-weight models with prompts (tests/runtime/prompt_models.py)."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "runtime"))

from prompt_models import prompted_model  # noqa: E402

from stableembed import Encoder  # noqa: E402
from stableembed.cli import main  # noqa: E402
from stableembed.export.parity import PARITY_TOLERANCE  # noqa: E402
from stableembed.runtime.verify import same_bits  # noqa: E402

pytestmark = pytest.mark.slow  # exports tiny models
TEXTS = ["first line", "ünïcödé 🚀", "a longer line of text about embeddings and prompts"]


def _stdout_rows(capsys) -> np.ndarray:
    return np.array([json.loads(line) for line in capsys.readouterr().out.splitlines()], dtype=np.float32)


@pytest.mark.parametrize("model", ["default", "excluded"])
def test_embed_with_prompt_options(model, tmp_path, capsys) -> None:
    art = str(prompted_model(model)[1])
    enc = Encoder(art)
    capsys.readouterr()
    for args, kw in ((["--prompt-name", "document"], {"prompt_name": "document"}),
                     (["--prompt", "custom: "], {"prompt": "custom: "}),
                     (["--prompt-name", "document", "--prompt", "wins: "], {"prompt": "wins: "}),
                     ([], {}),  # the model's default prompt, if any
                     (["--prompt", ""], {"prompt": ""})):
        both = "--prompt" in args and "--prompt-name" in args
        with pytest.warns(UserWarning, match="using prompt") if both else nullcontext():
            assert main(["embed", art, *TEXTS, *args]) == 0
        assert same_bits(_stdout_rows(capsys), enc.encode(TEXTS, **kw)).all(), args
    # the prompts do change the output (else the loop above proves nothing)
    assert not same_bits(enc.encode(TEXTS, prompt_name="document"), enc.encode(TEXTS, prompt="")).any()
    # streamed to a file: .npy and .jsonl
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    ref = enc.encode(TEXTS, prompt_name="instruct")
    assert main(["embed", art, "-i", str(src), "-o", str(tmp_path / "o.npy"), "--prompt-name", "instruct"]) == 0
    assert same_bits(np.load(tmp_path / "o.npy"), ref).all()
    assert main(["embed", art, "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--prompt-name", "instruct",
                 "--chunk-size", "2", "--mode", "fixed"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == TEXTS  # the texts as given, without the prompt
    assert same_bits(np.array([r["embedding"] for r in rows], dtype=np.float32), ref).all()


def test_unknown_prompt_name_is_a_clear_cli_error(tmp_path, capsys) -> None:
    art = str(prompted_model("default")[1])
    assert main(["embed", art, "text", "--prompt-name", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown prompt name 'nope'" in err and "'query'" in err and "'instruct'" in err
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n", encoding="utf-8")
    assert main(["embed", art, "-i", str(src), "-o", str(tmp_path / "o.npy"), "--prompt-name", "nope"]) == 2
    assert "unknown prompt name 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()  # refused before any output
    assert main(["verify", art, "x", "--prompt-name", "nope", "--no-subprocess"]) == 2
    assert "unknown prompt name 'nope'" in capsys.readouterr().err


def test_verify_and_info_with_prompts(capsys) -> None:
    src, art = prompted_model("excluded")
    capsys.readouterr()
    assert main(["verify", str(art), *TEXTS, "--prompt-name", "instruct", "--parity", str(src)]) == 0
    out = capsys.readouterr().out
    assert "with the prompt 'Represent this sentence" in out and "fresh process" in out
    assert f"within {PARITY_TOLERANCE}" in out and "verdict: OK" in out
    assert main(["verify", str(art), *TEXTS, "--prompt", "q: ", "--no-subprocess"]) == 0
    assert "with the prompt 'q: '" in capsys.readouterr().out
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert "query='query: '" in out and "not pooled" in out
    assert main(["info", str(prompted_model("default")[1])]) == 0
    assert "query='query: ' (default)" in capsys.readouterr().out


def test_npy_resume_refuses_another_prompt(tmp_path, monkeypatch) -> None:
    from stableembed.streaming import embed_file

    enc = Encoder(prompted_model("default")[1])
    texts = [f"line number {i}" for i in range(12)]
    src, out = tmp_path / "in.txt", tmp_path / "o.npy"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    real, calls = enc._encode_chunk, {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(enc, "_encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_file(enc, str(src), str(out), chunk_size=4, prompt_name="document")
    monkeypatch.setattr(enc, "_encode_chunk", real)
    with pytest.raises(ValueError, match="started with the prompt 'passage: ', this run's is 'query: '"):
        embed_file(enc, str(src), str(out), chunk_size=4, resume=True)  # the default prompt: another one
    assert embed_file(enc, str(src), str(out), chunk_size=4, resume=True, prompt_name="document") == 8
    assert same_bits(np.load(out), enc.encode(texts, prompt_name="document")).all()

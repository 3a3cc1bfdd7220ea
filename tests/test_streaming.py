"""CLI streaming to .npy/.jsonl: same bits as encode, resumable after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.cli import main
from stableembed.runtime.verify import same_bits
from stableembed.streaming import embed_file


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact, check_hashes=False)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT artifact: another model, another width."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))
    from tiny_models import Case, TinyZoo

    return TinyZoo(tmp_path_factory.mktemp("tiny")).artifact(Case("bert"))[0]


@pytest.fixture
def corpus(tmp_path, real_texts):
    texts = [t.replace("\n", " ") for t in real_texts[:70]]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts), encoding="utf-8")  # no trailing newline on purpose
    return path, texts


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_interrupted_run_resumes_without_recomputing(enc, corpus, tmp_path, suffix, monkeypatch) -> None:
    path, texts = corpus
    out = tmp_path / f"out{suffix}"
    ref = enc.encode(texts)
    calls = {"n": 0}
    real = enc._encode_chunk

    def dying(chunk, offset, batch_size, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(chunk, offset, batch_size, *rest)

    monkeypatch.setattr(enc, "_encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_file(enc, str(path), str(out), chunk_size=16)
    monkeypatch.setattr(enc, "_encode_chunk", real)
    if suffix == ".jsonl":
        with open(out, "a", encoding="utf-8") as f:
            f.write('{"text": "torn')  # a torn last line from the crash
    assert embed_file(enc, str(path), str(out), chunk_size=16, resume=True) == len(texts) - 32
    if suffix == ".npy":
        got = np.load(out)
        assert not (tmp_path / "out.npy.progress").exists()
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["text"] for r in rows] == texts
        got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert got.shape == ref.shape and same_bits(got, ref).all()
    assert embed_file(enc, str(path), str(out), resume=True) == 0  # finished: nothing left


def test_cli_streaming_and_errors(minilm_artifact, corpus, tmp_path, capsys) -> None:
    path, texts = corpus
    assert main(["embed", str(minilm_artifact), "-i", str(path), "-o", str(tmp_path / "o.npy"), "--chunk-size", "7"]) == 0
    assert same_bits(np.load(tmp_path / "o.npy"), Encoder(minilm_artifact).encode(texts)).all()
    assert main(["embed", str(minilm_artifact), "-i", "-", "-o", str(tmp_path / "o2.npy")]) == 2
    assert ".npy output needs the row count" in capsys.readouterr().err
    assert main(["embed", str(minilm_artifact), "-o", str(tmp_path / "o.csv"), "-i", str(path)]) == 2
    assert "must end in .npy or .jsonl" in capsys.readouterr().err
    for size in ("0", "-1"):  # a chunk of no texts would end the run at once and call it finished
        out = tmp_path / f"chunk{size}.npy"
        assert main(["embed", str(minilm_artifact), "-i", str(path), "-o", str(out), "--chunk-size", size]) == 2
        assert f"chunk_size must be a positive int, got {size}" in capsys.readouterr().err
        assert not out.exists() and not out.with_name(out.name + ".progress").exists()
    assert main(["embed", str(minilm_artifact), "some text", "-i", str(path)]) == 2
    assert "as arguments or with --input, not both" in capsys.readouterr().err
    assert main(["embed", str(minilm_artifact), "-i", str(tmp_path)]) == 2  # a folder: one line, no traceback
    assert "Is a directory" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["verify", str(minilm_artifact), "-i", str(empty), "--no-subprocess"]) == 2
    assert "no texts to check the guarantee on" in capsys.readouterr().err


def test_crlf_input_gives_the_same_texts_and_bits_on_every_path(minilm_artifact, tmp_path, capsys,
                                                               monkeypatch) -> None:
    """One reader for -i FILE and stdin, stdout and -o: CRLF endings are cut the same way everywhere, a
    lone \\r stays inside its text (it is no line break), a leading byte-order mark is dropped, and every
    path gives the same bits."""
    import io
    import sys

    texts = ["first line", "", "carriage\rreturn inside", "ünïcödé 🚀", "  spaced  ", "last, no newline"]
    data = ("\r\n".join(texts)).encode("utf-8-sig")  # with a byte-order mark, as spreadsheet exports write
    path = tmp_path / "crlf.txt"
    path.write_bytes(data)
    ref = Encoder(minilm_artifact).encode(texts)
    art = str(minilm_artifact)

    def stdout_rows(argv: list[str], stdin: bytes | None = None) -> np.ndarray:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        assert main(argv) == 0
        return np.array([json.loads(line) for line in capsys.readouterr().out.splitlines()], dtype=np.float32)

    from_file = stdout_rows(["embed", art, "-i", str(path)])
    from_stdin = stdout_rows(["embed", art], stdin=data)
    assert main(["embed", art, "-i", str(path), "-o", str(tmp_path / "o.npy")]) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(["embed", art, "-i", "-", "-o", str(tmp_path / "o.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts
    for got in (from_file, from_stdin, np.load(tmp_path / "o.npy"),
                np.array([r["embedding"] for r in rows], dtype=np.float32)):
        assert got.shape == ref.shape and same_bits(got, ref).all()


def test_jsonl_resume_refuses_another_prompt_or_input(enc, corpus, tmp_path) -> None:
    path, texts = corpus
    out = tmp_path / "out.jsonl"
    _interrupted(enc, path, out, prompt="query: ")
    before = out.read_bytes()
    rows = [json.loads(line) for line in before.decode().splitlines()]
    assert len(rows) == 32 and {r["prompt"] for r in rows} == {"query: "}
    with pytest.raises(ValueError, match="started with the prompt 'query: ', this run's is None"):
        embed_file(enc, str(path), str(out), resume=True)
    with pytest.raises(ValueError, match="started with the prompt 'query: ', this run's is 'passage: '"):
        embed_file(enc, str(path), str(out), resume=True, prompt="passage: ")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(texts[:31] + ["a different line 32"] + texts[32:]), encoding="utf-8")
    with pytest.raises(ValueError, match="row 32 was embedded from another text than the input's line 32 "
                                         r"\('a different line 32'\): another input"):
        embed_file(enc, str(other), str(out), resume=True, prompt="query: ")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(texts[:20]), encoding="utf-8")
    with pytest.raises(ValueError, match="holds 32 rows, the input has fewer lines"):
        embed_file(enc, str(short), str(out), resume=True, prompt="query: ")
    assert out.read_bytes() == before  # nothing lost, nothing appended
    assert embed_file(enc, str(path), str(out), resume=True, prompt="query: ", chunk_size=16) == len(texts) - 32
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    ref = enc.encode(texts, prompt="query: ")
    assert [r["text"] for r in rows] == texts
    assert same_bits(np.array([r["embedding"] for r in rows], dtype=np.float32), ref).all()


@pytest.mark.parametrize("line_bytes", [10, 70_000, 1_500_000])  # lines inside one 1 MiB block, and across blocks
@pytest.mark.parametrize("lines", [1, 3])
def test_jsonl_done_finds_the_last_complete_line(tmp_path, line_bytes, lines) -> None:
    from stableembed.streaming import _jsonl_done

    out = tmp_path / "o.jsonl"
    records = [{"text": f"t{i}", "pad": "x" * line_bytes} for i in range(lines)]
    body = "".join(json.dumps(r) + "\n" for r in records)
    out.write_text(body + '{"text": "torn', encoding="utf-8")
    assert _jsonl_done(out) == (lines, records[-1])
    assert out.read_text(encoding="utf-8") == body  # the torn tail is cut off
    out.write_text("")
    assert _jsonl_done(out) == (0, None)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_npy_killed_at_any_rename_resumes_to_the_right_rows(enc, corpus, tmp_path, monkeypatch, kill_at) -> None:
    """A fresh .npy run renames the progress record (1), the preallocated array (2), then the progress
    record after each chunk (3, 4...). Killed at any of them, a resume gives every row's right bits, and
    no temporary file is left behind; an .npy without a progress record is only ever a finished one."""
    import stableembed.streaming as streaming

    path, texts = corpus
    out = tmp_path / "out.npy"
    real, calls = streaming.os.replace, {"n": 0}

    def dying(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(streaming.os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        embed_file(enc, str(path), str(out), chunk_size=16)
    monkeypatch.setattr(streaming.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert out.exists() == (kill_at >= 3)
    written = embed_file(enc, str(path), str(out), chunk_size=16, resume=True)
    assert written == len(texts) - 16 * max(0, kill_at - 3)
    assert same_bits(np.load(out), enc.encode(texts)).all()
    assert not (tmp_path / "out.npy.progress").exists()


def test_npy_unreadable_progress_is_named(enc, corpus, tmp_path) -> None:
    path, _ = corpus
    out = tmp_path / "out.npy"
    _interrupted(enc, path, out)
    (tmp_path / "out.npy.progress").write_text("", encoding="utf-8")  # as a torn write left it
    with pytest.raises(ValueError, match=r"its progress record .*out\.npy\.progress is unreadable .*delete both"):
        embed_file(enc, str(path), str(out), resume=True, chunk_size=16)


def _interrupted(enc, path, out, **kw):
    """A run of `path` that dies after its first two chunks of 16."""
    real = enc._encode_chunk
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    enc._encode_chunk = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_file(enc, str(path), str(out), chunk_size=16, **kw)
    finally:
        del enc._encode_chunk


class _OtherBits:
    """Stands in for another model of the same width: this encoder with every bit pattern moved by one ULP."""

    def __init__(self, enc):
        self.enc, self.dim, self.manifest = enc, enc.dim, enc.manifest

    def _encode_chunk(self, *args):
        out = self.enc._encode_chunk(*args)
        return (out.view(np.uint32) + np.uint32(1)).view(np.float32)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_resume_refuses_another_model_or_input(enc, corpus, tmp_path, tiny_bert, suffix) -> None:
    path, texts = corpus
    out = tmp_path / f"out{suffix}"
    _interrupted(enc, path, out)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="row 32 holds other bits than this encoder gives the same text: it was "
                                         "embedded with another model, artifact, graph or provider"):
        embed_file(_OtherBits(enc), str(path), str(out), resume=True, chunk_size=16)
    tiny = Encoder(tiny_bert)  # another width
    with pytest.raises(ValueError, match=f"(rows hold 384 values, this encoder's embeddings {tiny.dim}|"
                                         f"shape \\(70, 384\\), this run writes float32 \\(70, {tiny.dim}\\))"):
        embed_file(tiny, str(path), str(out), resume=True, chunk_size=16)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(texts[:31] + ["a different line 32"] + texts[32:]), encoding="utf-8")
    with pytest.raises(ValueError, match="row 32 was embedded from another text than the input's line 32"):
        embed_file(enc, str(other), str(out), resume=True, chunk_size=16)
    assert out.read_bytes() == before  # nothing lost, nothing appended
    assert embed_file(enc, str(path), str(out), resume=True, chunk_size=16) == len(texts) - 32
    if suffix == ".npy":  # a finished file too is checked against this model
        with pytest.raises(ValueError, match="row 70 holds other bits"):
            embed_file(_OtherBits(enc), str(path), str(out), resume=True)
        assert embed_file(enc, str(path), str(out), resume=True) == 0


def test_an_empty_prompt_resumes_as_no_prompt(enc, corpus, tmp_path) -> None:
    path, texts = corpus
    for suffix in (".npy", ".jsonl"):
        out = tmp_path / f"out{suffix}"
        _interrupted(enc, path, out, prompt="")
        assert embed_file(enc, str(path), str(out), resume=True, chunk_size=16) == len(texts) - 32


def test_pipes_feed_jsonl_and_are_refused_for_npy(enc, tmp_path) -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    texts = ["first text", "second text", "third"]
    fifo = tmp_path / "fifo"
    pool = ThreadPoolExecutor(1)
    for suffix in (".jsonl", ".npy"):
        os.mkfifo(fifo)
        writer = pool.submit(fifo.write_text, "\n".join(texts) + "\n", encoding="utf-8")
        out = tmp_path / f"out{suffix}"
        try:
            if suffix == ".jsonl":
                assert embed_file(enc, str(fifo), str(out)) == 3
                rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
                assert same_bits(np.array([r["embedding"] for r in rows], np.float32), enc.encode(texts)).all()
            else:
                with pytest.raises(ValueError, match="read from a regular file .*a pipe"):
                    embed_file(enc, str(fifo), str(out))
                assert not out.exists()
                with open(fifo, encoding="utf-8") as f:  # let the writer finish
                    f.read()
        finally:
            writer.result(timeout=30)  # the writer's own errors surface here
            fifo.unlink()
    pool.shutdown()


def test_bad_options_fail_before_the_output_is_touched(minilm_artifact, corpus, tmp_path, capsys) -> None:
    path, _ = corpus
    out = tmp_path / "kept.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    assert main(["embed", str(minilm_artifact), "-i", str(path), "-o", str(out), "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert not (tmp_path / "kept.npy").exists()
    for flags in (["--resume"], ["--chunk-size", "8"]):
        assert main(["embed", str(minilm_artifact), "-i", str(path), *flags]) == 2
        assert "apply to --output" in capsys.readouterr().err

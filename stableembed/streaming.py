"""Embed a text file (one text per line) to .npy or .jsonl in bounded memory, resumably.

Memory: one chunk of texts and their embeddings at a time (chunk_size x dim float32), whatever the
file's length. Progress is durable per chunk: .jsonl output is appended and flushed, .npy rows are
written in place into a preallocated file and a sidecar `OUT.progress` records how many rows are done.
`resume=True` continues after the last complete chunk without recomputing what was written.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from .runtime import Encoder
from .runtime.encoder import check_chunk_size
from .runtime.tokenize import resolve_prompt


def _lines(stream: IO[str]) -> Iterator[str]:
    """Lines split on \n only (as _count_lines counts them), without their \n or \r\n ending."""
    for line in stream:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        yield line


@contextlib.contextmanager
def read_lines(source: str | None) -> Iterator[Iterator[str]]:
    """The texts of `source`, one per line: a file, or stdin for None or '-'. The one reader of every
    command's input, so a file and the same bytes on stdin give the same texts: UTF-8, split on \n only
    (a lone \r stays in its text), each line without its \n or \r\n ending."""
    if source not in (None, "-"):
        with open(source, encoding="utf-8", newline="\n") as f:  # type: ignore[arg-type]
            yield _lines(f)
        return
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # stdin replaced by a text stream (an embedding application, a test): read it as is
        yield _lines(sys.stdin)
        return
    stream = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    try:
        yield _lines(stream)
    finally:
        stream.detach()  # leave sys.stdin's buffer open


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            n += 1
    return n


def _jsonl_done(path: Path) -> tuple[int, dict | None]:
    """Complete lines in an existing .jsonl output and the last of them, parsed; a torn last line is cut
    off. Reads the file in 1 MiB blocks (an output of millions of rows is never held in memory)."""
    if not path.exists():
        return 0, None
    lines, first, end, pos = 0, 0, 0, 0  # [first, end): the last complete line, newline included
    with open(path, "r+b") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n = block.count(b"\n")
            if n:
                nl = block.rfind(b"\n")
                # it starts after this block's previous newline, or else where the line before it ended
                first = pos + block.rfind(b"\n", 0, nl) + 1 if n > 1 else end
                end = pos + nl + 1
                lines += n
            pos += len(block)
        if end != pos:
            f.truncate(end)
        if not lines:
            return 0, None
        f.seek(first)
        last = f.read(end - first)
    try:
        return lines, json.loads(last)
    except ValueError as exc:
        raise ValueError(f"cannot resume {path}: its line {lines} is not JSON ({exc})") from exc


def _check_resume(out: Path, texts: Iterator[str], done: int, last: dict | None,
                  prompt: str | None) -> Iterator[str]:
    """`texts` after the `done` already in `out`, once the input and the prompt are those `out` was started
    with: its last line must hold the input's line `done` and this run's prompt (rows embedded from other
    texts or with another prompt would otherwise be mixed in silently)."""
    if not done:
        return texts
    if not isinstance(last, dict) or last.get("prompt") != prompt:
        started = last.get("prompt") if isinstance(last, dict) else None
        raise ValueError(f"cannot resume {out}: it was started with the prompt {started!r}, this run's is "
                         f"{prompt!r}")
    skipped = list(itertools.islice(texts, done - 1, done))
    if not skipped:
        raise ValueError(f"cannot resume {out}: it holds {done} rows, the input has fewer lines")
    if skipped[0] != last.get("text"):
        raise ValueError(f"cannot resume {out}: its line {done} holds the text {str(last.get('text'))[:60]!r}, "
                         f"the input's line {done} is {skipped[0][:60]!r}: another input?")
    return texts


def embed_file(enc: Encoder, source: str | None, output: str, *, resume: bool = False, chunk_size: int = 4096,
               batch_size: int = 32, progress: bool | None = None, prompt_name: str | None = None,
               prompt: str | None = None) -> int:
    """Embed every line of `source` (None or '-': stdin) into `output`; returns the rows written now.
    `prompt_name` / `prompt` as in `Encoder.encode`."""
    check_chunk_size(chunk_size)  # before any output is opened
    chosen = resolve_prompt(enc.manifest, prompt_name, prompt)  # an unknown name fails before any output
    out = Path(output)
    if out.suffix not in (".npy", ".jsonl"):
        raise ValueError(f"output must end in .npy or .jsonl: {output}")
    from_stdin = source in (None, "-")
    if out.suffix == ".npy" and from_stdin:
        raise ValueError(".npy output needs the row count up front: read from a file, or write .jsonl")
    total = None if from_stdin else _count_lines(Path(source))  # type: ignore[arg-type]
    with read_lines(source) as texts:
        if out.suffix == ".jsonl":
            done, last = _jsonl_done(out) if resume else (0, None)
            texts = _check_resume(out, texts, done, last, chosen)  # before the output is opened to append
            sink = open(out, "a" if resume else "w", encoding="utf-8")
        else:
            done, sink = _open_npy(out, total or 0, enc.dim, resume, chosen)
            texts = itertools.islice(texts, done, None)
        # .jsonl lines name their prompt when there is one, so a resumed run can check it
        tag = {} if chosen is None else {"prompt": chosen}
        show = progress if progress is not None else (total or 0) >= 1000
        written = 0
        with sink:
            for chunk_texts, emb in _chunks(enc, texts, chunk_size, batch_size, show, total, done, chosen):
                if out.suffix == ".jsonl":
                    sink.write("".join(json.dumps({"text": t, **tag, "embedding": [float(v) for v in row]},
                                                  ensure_ascii=False) + "\n" for t, row in zip(chunk_texts, emb)))
                else:
                    sink.write(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
                sink.flush()
                os.fsync(sink.fileno())
                written += len(emb)
                if out.suffix == ".npy":
                    _progress_file(out).write_text(json.dumps({"rows_done": done + written, "rows": total,
                                                               "prompt": chosen}))
        if out.suffix == ".npy":
            _progress_file(out).unlink(missing_ok=True)
    return written


def _chunks(enc: Encoder, texts: Iterator[str], chunk_size: int, batch_size: int, show: bool,
            total: int | None, done: int, prompt: str | None) -> Iterator[tuple[list[str], np.ndarray]]:
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, unit="text", desc="embedding")
    try:
        offset = done
        while True:
            chunk = list(itertools.islice(texts, chunk_size))
            if not chunk:
                return
            yield chunk, enc._encode_chunk(chunk, offset, batch_size, prompt)
            offset += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _progress_file(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def _open_npy(out: Path, rows: int, dim: int, resume: bool, prompt: str | None) -> tuple[int, IO[bytes]]:
    done = 0
    if resume and out.exists() and _progress_file(out).exists():
        state = json.loads(_progress_file(out).read_text())
        if state.get("rows") != rows:
            raise ValueError(f"cannot resume {out}: it was started for {state.get('rows')} rows, the input has {rows}")
        if state.get("prompt") != prompt:  # rows embedded with another prompt would be mixed in silently
            raise ValueError(f"cannot resume {out}: it was started with the prompt {state.get('prompt')!r}, "
                             f"this run's is {prompt!r}")
        done = int(state["rows_done"])
    elif resume and out.exists():
        arr = np.load(out, mmap_mode="r")
        if arr.shape == (rows, dim):
            return rows, open(os.devnull, "wb")  # finished earlier: nothing to do
        raise ValueError(f"cannot resume {out}: no progress record and its shape is {arr.shape}")
    else:
        np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(rows, dim)).flush()
        _progress_file(out).write_text(json.dumps({"rows_done": 0, "rows": rows, "prompt": prompt}))
    f = open(out, "r+b")
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_1_0(f)
    f.seek(f.tell() + done * dim * 4)
    return done, f

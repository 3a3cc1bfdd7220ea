"""Embed a text file (one text per line) to .npy or .jsonl in bounded memory, resumably.

Memory: one chunk of texts and their embeddings at a time (chunk_size x dim float32), whatever the
file's length. Progress is durable per chunk: .jsonl output is appended and flushed, .npy rows are
written in place into a preallocated file and a sidecar `OUT.progress` records how many rows are done.
`resume=True` continues after the last complete chunk without recomputing what was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import sys
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from .runtime import Encoder
from .runtime.encoder import check_batch_size, check_chunk_size
from .runtime.tokenize import resolve_prompt


def _lines(stream: IO[str]) -> Iterator[str]:
    """Lines split on \n only (as _count_lines counts them), without their \n or \r\n ending."""
    for line in stream:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        yield line


def split_lines(text: str) -> list[str]:
    """`text`'s lines by the rule `read_lines` reads a file with (the same `_lines`): split on \n only, each
    line without its \n or \r\n ending (a lone \r, \x0c or U+2028 stays in its text, where
    str.splitlines would split)."""
    return list(_lines(io.StringIO(text, newline="\n")))


@contextlib.contextmanager
def read_lines(source: str | None) -> Iterator[Iterator[str]]:
    """The texts of `source`, one per line: a file, or stdin for None or '-'. The one reader of every
    command's input, so a file and the same bytes on stdin give the same texts: UTF-8 (a leading byte-order
    mark dropped), split on \n only
    (a lone \r stays in its text), each line without its \n or \r\n ending."""
    # utf-8-sig: a byte-order mark at the start (as some editors and spreadsheet exports write) is not text
    if source not in (None, "-"):
        with open(source, encoding="utf-8-sig", newline="\n") as f:  # type: ignore[arg-type]
            yield _lines(f)
        return
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # stdin replaced by a text stream (an embedding application, a test): read it as is
        yield _lines(sys.stdin)
        return
    stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="\n")
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


def _check_resume(enc: Encoder, out: Path, texts: Iterator[str], done: int, recorded: Callable[[str], bool],
                  row: object, prompt: str | None, batch_size: int) -> Iterator[str]:
    """`texts` after the `done` rows already in `out`, once `out` was started from this input with this
    model: the input's line `done` must be the text recorded for row `done` (`recorded(text)`), and this
    encoder must give that text exactly the bits stored in `row`. By the stability guarantee the same
    artifact and provider give those bits whatever the batch; another model, artifact, graph or provider
    gives others, and its rows would be mixed in silently."""
    if not done:
        return texts
    line = list(itertools.islice(texts, done - 1, done))
    if not line:
        raise ValueError(f"cannot resume {out}: it holds {done} rows, the input has fewer lines")
    if not recorded(line[0]):
        raise ValueError(f"cannot resume {out}: its row {done} was embedded from another text than the input's "
                         f"line {done} ({line[0][:60]!r}): another input?")
    try:
        stored = np.asarray(row, dtype=np.float32)
    except (TypeError, ValueError):
        stored = np.empty(0, np.float32)
    if stored.shape != (enc.dim,):
        raise ValueError(f"cannot resume {out}: its rows hold {stored.size} values, this encoder's embeddings "
                         f"{enc.dim}: another model or truncate_dim?")
    fresh = enc._encode_chunk([line[0]], done - 1, batch_size, prompt)[0]
    if not np.array_equal(fresh.view(np.uint32), stored.view(np.uint32)):
        raise ValueError(f"cannot resume {out}: its row {done} holds other bits than this encoder gives the same "
                         f"text: it was embedded with another model, artifact, graph or provider, or another "
                         f"truncate_dim / normalize_embeddings setting")
    return texts


def _check_prompt(out: Path, started: str | None, prompt: str | None) -> None:
    if (started or None) != (prompt or None):  # "" and None both mean no prompt
        raise ValueError(f"cannot resume {out}: it was started with the prompt {started!r}, this run's is "
                         f"{prompt!r}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def embed_file(enc: Encoder, source: str | None, output: str, *, resume: bool = False, chunk_size: int = 4096,
               batch_size: int = 32, progress: bool | None = None, prompt_name: str | None = None,
               prompt: str | None = None) -> int:
    """Embed every line of `source` (None or '-': stdin) into `output`; returns the rows written now.
    `prompt_name` / `prompt` as in `Encoder.encode`. A resumed run checks that the output was started
    from this input, with this prompt and this model (the bits of its last row, recomputed)."""
    check_chunk_size(chunk_size)  # before any output is opened
    check_batch_size(batch_size)
    chosen = resolve_prompt(enc.manifest, prompt_name, prompt) or None  # an unknown name fails before any output
    out = Path(output)
    if out.suffix not in (".npy", ".jsonl"):
        raise ValueError(f"output must end in .npy or .jsonl: {output}")
    from_stdin = source in (None, "-")
    if not from_stdin and not os.path.exists(source):  # type: ignore[arg-type]
        raise FileNotFoundError(f"input not found: {source}")
    regular = not from_stdin and os.path.isfile(source)  # type: ignore[arg-type]
    if out.suffix == ".npy" and not regular:
        raise ValueError(".npy output needs the row count up front: read from a regular file (not stdin, a "
                         "pipe or a device), or write .jsonl")
    total = _count_lines(Path(source)) if regular else None  # type: ignore[arg-type]
    with read_lines(source) as texts:
        if out.suffix == ".jsonl":
            done, last = _jsonl_done(out) if resume else (0, None)
            if done:
                if not isinstance(last, dict):
                    raise ValueError(f"cannot resume {out}: its line {done} is not an embedding record")
                _check_prompt(out, last.get("prompt"), chosen)
                texts = _check_resume(enc, out, texts, done, lambda t: t == last.get("text"),
                                      last.get("embedding"), chosen, batch_size)  # before opening to append
            sink = open(out, "a" if resume else "w", encoding="utf-8")
        else:
            done, sink, recorded, row = _open_npy(out, total or 0, enc.dim, resume, chosen)
            try:
                texts = _check_resume(enc, out, texts, done, recorded, row, chosen, batch_size)
            except BaseException:
                sink.close()
                raise
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
                    _write_progress(out, {"rows_done": done + written, "rows": total, "prompt": chosen,
                                          "text_sha256": _sha256(chunk_texts[-1])})
        if out.suffix == ".npy":
            _progress_file(out).unlink(missing_ok=True)  # the mark of a finished file: no progress record
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


def _write_progress(out: Path, state: dict) -> None:
    """The progress record, durably and whole: written to a new file, synced, renamed over the old."""
    path = _progress_file(out)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_progress(out: Path) -> dict:
    path = _progress_file(out)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["rows_done"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume {out}: its progress record {path} is unreadable ({exc}); delete both "
                         f"files to start over") from None


def _open_npy(out: Path, rows: int, dim: int, resume: bool,
              prompt: str | None) -> tuple[int, IO[bytes], Callable[[str], bool], np.ndarray | None]:
    """(rows done, the file open at the next row, a check of the last done row's text, that row).

    A fresh file: the progress record first, then the preallocated array under a temporary name, renamed
    into place; so an .npy without a progress record is a finished one, whatever moment a run was killed at."""
    recorded: Callable[[str], bool] = lambda text: True  # noqa: E731 (a finished file records no text)
    if resume and out.exists() and _progress_file(out).exists():
        state = _read_progress(out)
        if state.get("rows") != rows:
            raise ValueError(f"cannot resume {out}: it was started for {state.get('rows')} rows, the input has {rows}")
        _check_prompt(out, state.get("prompt"), prompt)
        done = int(state["rows_done"])
        if "text_sha256" in state:
            recorded = lambda text: _sha256(text) == state["text_sha256"]  # noqa: E731
    elif resume and out.exists():
        done = rows  # finished earlier: nothing to do once the checks below pass
    else:
        _write_progress(out, {"rows_done": 0, "rows": rows, "prompt": prompt})
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim)).flush()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        done = 0
    f = open(out, "r+b")
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"cannot resume {out}: .npy format version {version} is not one this writes")
        shape, fortran, dtype = read_header(f)
        if shape != (rows, dim) or fortran or dtype != np.dtype("<f4"):
            raise ValueError(f"cannot resume {out}: it holds a {dtype} array of shape {shape}, this run writes "
                             f"float32 ({rows}, {dim}): another input or model?")
        start = f.tell()
        row = None
        if done:
            f.seek(start + (done - 1) * dim * 4)
            row = np.frombuffer(f.read(dim * 4), dtype="<f4")
        f.seek(start + done * dim * 4)
    except BaseException:
        f.close()
        raise
    return done, f, recorded, row

"""Embed a corpus larger than one machine with Ray Data: files (text or JSON lines) -> Parquet.

The recipe is one `map_batches` over an actor pool; each actor loads one `Encoder` when it starts and
embeds the batches Ray hands it:

    import ray
    from stableembed.serve.ray_data import embed_files_to_parquet

    ray.init()                                   # or ray.init(address="auto") on a cluster
    embed_files_to_parquet(["corpus/part-0.jsonl", ...], "artifacts/minilm", "out/embeddings",
                           num_actors=7, threads_per_actor=2)   # 14 of 16 CPUs: leave some for read/write

Because each text's embedding is bit-identical whatever batch it is computed in, the vectors in the
Parquet files equal, bit for bit, what one `Encoder.encode` call gives in a single process: the number of
blocks, actors, files and the batch size change only speed and file layout, never a value.

The artifact folder must be readable at the same path on every node (shared storage, or copied there
first). Output columns: every input column (for text files: `text`, and `path` with `include_paths`),
plus `embedding` as a Parquet fixed_size_list<float32>[dim] column that any Parquet reader understands.
`prompt_name` / `prompt` choose the prompt put before every text, as in `Encoder.encode` (the model's
default prompt when neither is given); an unknown name fails before any Ray work starts.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

from .._extras import require

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class EmbedBatches:
    """Ray Data callable class: one Encoder per actor; pyarrow Table in -> same Table + `embedding`.

    Pass it to `Dataset.map_batches(EmbedBatches, batch_format="pyarrow", compute=ActorPoolStrategy(...),
    fn_constructor_kwargs={"artifact": ...})`.
    """

    def __init__(self, artifact: str, text_column: str = "text", output_column: str = "embedding",
                 threads: int | None = 1, batch_size: int = 32, mode: str = "dynamic",
                 prompt_name: str | None = None, prompt: str | None = None):
        from ..runtime import Encoder

        self.encoder = Encoder(artifact, mode=mode, threads=threads)
        self.text_column = text_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.prompt = {"prompt_name": prompt_name, "prompt": prompt}

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        if self.output_column in batch.schema.names:  # append_column would write a second column of that name
            raise ValueError(f"the input already has a column {self.output_column!r}; pass another "
                             f"output_column")
        if self.text_column not in batch.schema.names:
            raise ValueError(f"the input has no column {self.text_column!r} (its columns: "
                             f"{', '.join(batch.schema.names)}); pass text_column")
        texts = batch.column(self.text_column).to_pylist()
        emb = self.encoder.encode(texts, batch_size=self.batch_size, **self.prompt)
        flat = pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, self.encoder.dim)
        return batch.append_column(self.output_column, column)


def _file_lines(row: dict, drop_empty: bool, include_paths: bool) -> list[dict]:
    """One row per line of a text file's bytes (UTF-8, split as `stableembed.streaming.split_lines`)."""
    from ..streaming import split_lines

    try:
        text = bytes(row["bytes"]).decode("utf-8-sig")  # a leading byte-order mark is not text (as the CLI)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{row['path']}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    extra = {"path": row["path"]} if include_paths else {}
    return [{"text": line, **extra} for line in split_lines(text) if line or not drop_empty]


def read_texts(paths: str | Sequence[str], text_column: str = "text", include_paths: bool = False,
               drop_empty_lines: bool = False, override_num_blocks: int | None = None) -> Any:
    """A Ray Dataset of texts: `.txt` files give one row per line (column `text`), `.jsonl`/`.json`
    files one row per JSON object (which must hold `text_column`). All paths must be of one kind."""
    ray_data = require("ray.data", "ray")
    paths = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    if not paths:
        raise ValueError("no input paths")
    kinds = {"text" if p.endswith(TEXT_SUFFIXES) else "jsonl" if p.endswith(JSONL_SUFFIXES) else p
             for p in paths}
    if len(kinds) != 1 or not kinds <= {"text", "jsonl"}:
        raise ValueError(f"inputs must be all text files {TEXT_SUFFIXES} or all JSON lines files "
                         f"{JSONL_SUFFIXES}; got {sorted(kinds)}")
    if kinds == {"text"}:
        if text_column != "text":
            raise ValueError("text files give a column named 'text'")
        # Not ray.data.read_text: it splits with str.splitlines (\x0c, a lone \r, U+2028 ... start new
        # rows) and drops whitespace-only lines; these rows are the lines `stableembed embed -i` reads.
        files = ray_data.read_binary_files(paths, include_paths=True, override_num_blocks=override_num_blocks)
        return files.flat_map(partial(_file_lines, drop_empty=drop_empty_lines, include_paths=include_paths))
    return ray_data.read_json(paths, lines=True, include_paths=include_paths,
                              override_num_blocks=override_num_blocks)


def embed_dataset(ds: Any, artifact: str | Path, *, text_column: str = "text", output_column: str = "embedding",
                  num_actors: int = 2, batch_rows: int = 256, threads_per_actor: int = 1,
                  cpus_per_actor: float | None = None, batch_size: int = 32, mode: str = "dynamic",
                  prompt_name: str | None = None, prompt: str | None = None) -> Any:
    """`ds` with an `embedding` column, computed by an actor pool of `num_actors` Encoders, each running
    `threads_per_actor` intra-op threads and reserving `cpus_per_actor` Ray CPUs (default: as many as its
    threads). `batch_rows`: rows per map_batches call; `batch_size`: the Encoder's; `prompt_name` /
    `prompt` as in `Encoder.encode`.

    The pool holds its CPUs for the whole run, and Ray Data's read and write tasks need CPUs too: a pool
    that reserves every CPU of the cluster waits forever for its input. So num_actors x cpus_per_actor
    must stay below the cluster's CPUs (checked here when Ray is already initialized).
    """
    ray = require("ray", "ray")
    ray_data = require("ray.data", "ray")
    from ..runtime.manifest import load_manifest
    from ..runtime.tokenize import resolve_prompt

    # here, not in the actors: a bad prompt name fails at once, not after Ray has started its pool
    resolve_prompt(load_manifest(artifact, check_hashes=False), prompt_name, prompt)
    cpus = float(threads_per_actor if cpus_per_actor is None else cpus_per_actor)
    if num_actors < 1 or cpus <= 0:
        raise ValueError("num_actors and cpus_per_actor must be positive")
    if ray.is_initialized():
        total = ray.cluster_resources().get("CPU", 0.0)
        if num_actors * cpus >= total:
            raise ValueError(f"an actor pool of {num_actors} x {cpus:g} CPUs would take all {total:g} CPUs of the "
                             f"cluster and leave none for reading and writing; use fewer actors or a fractional "
                             f"cpus_per_actor")
    return ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"artifact": str(Path(artifact).resolve()), "text_column": text_column,
                               "output_column": output_column, "threads": threads_per_actor,
                               "batch_size": batch_size, "mode": mode, "prompt_name": prompt_name,
                               "prompt": prompt},
        batch_size=batch_rows,
        batch_format="pyarrow",
        compute=ray_data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus,
    )


def embed_files_to_parquet(paths: str | Sequence[str], artifact: str | Path, output_dir: str | Path, *,
                           text_column: str = "text", num_actors: int = 2, batch_rows: int = 256,
                           threads_per_actor: int = 1, cpus_per_actor: float | None = None,
                           batch_size: int = 32, num_blocks: int | None = None,
                           include_paths: bool = False, drop_empty_lines: bool = False,
                           prompt_name: str | None = None, prompt: str | None = None) -> str:
    """Read `paths`, embed every row, write Parquet files into `output_dir` (returned). `num_blocks`
    repartitions the input first (more blocks: more parallelism and more, smaller files); `prompt_name` /
    `prompt` as in `Encoder.encode`."""
    ds = read_texts(paths, text_column=text_column, include_paths=include_paths,
                    drop_empty_lines=drop_empty_lines)
    if num_blocks is not None:
        ds = ds.repartition(num_blocks)
    ds = embed_dataset(ds, artifact, text_column=text_column, num_actors=num_actors, batch_rows=batch_rows,
                       threads_per_actor=threads_per_actor, cpus_per_actor=cpus_per_actor,
                       batch_size=batch_size, prompt_name=prompt_name, prompt=prompt)
    out = str(Path(output_dir).resolve())
    ds.write_parquet(out)
    return out

"""The Ray Data recipe on a local cluster: files -> actor pool of Encoders -> Parquet, and the vectors equal
the single-process Encoder's bit for bit whatever the partitioning, actor count or batch size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.data  # noqa: F401  (the test extra installs ray[data]: a broken install fails here, not skips)

from stableembed.runtime.verify import same_bits
from stableembed.serve.ray_data import embed_files_to_parquet


@pytest.fixture(scope="module")
def local_ray():
    # 4 logical CPUs on any machine: the actor pools below take 1 or 2, reads and writes the rest.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(real_texts, tmp_path_factory):
    """~200 texts: the real mix (empty, unicode, control characters, over-long) and more short ones."""
    short = (Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "short.txt").read_text(
        encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(real_texts + short[:100]))[:210]  # distinct: ids below are list positions
    folder = tmp_path_factory.mktemp("corpus")
    parts = [texts[0::3], texts[1::3], texts[2::3]]
    jsonl = []
    for k, part in enumerate(parts):
        path = folder / f"part-{k}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for text in part:
                f.write(json.dumps({"id": texts.index(text), "text": text}) + "\n")
        jsonl.append(str(path))
    lines = [t for t in texts if t and "\n" not in t and "\r" not in t]  # one text a line
    txt = []
    for k in range(2):
        path = folder / f"part-{k}.txt"
        path.write_text("\n".join(lines[k::2]) + "\n", encoding="utf-8")
        txt.append(str(path))
    return texts, jsonl, lines, txt


def _read(folder) -> tuple[dict, np.ndarray]:
    table = pq.read_table(str(folder))
    emb = table.column("embedding").combine_chunks()
    vectors = emb.flatten().to_numpy().reshape(len(table), emb.type.list_size)
    return table.to_pydict(), vectors


@pytest.mark.slow
def test_parquet_vectors_equal_single_process_whatever_the_partitioning(local_ray, corpus, minilm_artifact,
                                                                        reference, tmp_path) -> None:
    texts, jsonl, lines, txt = corpus
    assert len(texts) >= 200
    ref = reference(texts)
    runs = {"one block, one actor": dict(num_blocks=1, num_actors=1, batch_rows=512, batch_size=32),
            "five blocks, two actors, tiny batches": dict(num_blocks=5, num_actors=2, batch_rows=7, batch_size=3)}
    for name, kwargs in runs.items():
        out = embed_files_to_parquet(jsonl, minilm_artifact, tmp_path / name.replace(" ", "_"), **kwargs)
        cols, vectors = _read(out)
        assert sorted(cols["id"]) == list(range(len(texts))), name
        assert [texts[i] for i in cols["id"]] == cols["text"], name
        assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
        assert same_bits(vectors, ref[cols["id"]]).all(), name

    # text files, one text a line, Ray's own partitioning
    out = embed_files_to_parquet(txt, minilm_artifact, tmp_path / "txt", num_actors=2, batch_rows=32,
                                 include_paths=True)
    cols, vectors = _read(out)
    assert sorted(cols["text"]) == sorted(lines)
    assert {p.rsplit("/", 1)[-1] for p in cols["path"]} == {"part-0.txt", "part-1.txt"}
    by_text = dict(zip(texts, ref))
    assert same_bits(vectors, np.stack([by_text[t] for t in cols["text"]])).all()


def test_pool_that_takes_every_cpu_is_refused(local_ray, minilm_artifact, corpus) -> None:
    with pytest.raises(ValueError, match="leave none for reading"):
        embed_files_to_parquet(corpus[1], minilm_artifact, "/nonexistent", num_actors=4)


def test_mixed_inputs_are_refused(local_ray, corpus) -> None:
    with pytest.raises(ValueError, match="all text files"):
        embed_files_to_parquet(corpus[1] + corpus[3], "unused", "/nonexistent")


@pytest.mark.slow
def test_prompt_reaches_every_actor(local_ray, corpus, minilm_artifact, tmp_path) -> None:
    from stableembed import Encoder

    texts, jsonl, _, _ = corpus
    out = embed_files_to_parquet(jsonl, minilm_artifact, tmp_path / "prompted", num_blocks=3, num_actors=2,
                                 batch_rows=50, prompt="query: ")
    cols, vectors = _read(out)
    ref = Encoder(minilm_artifact, check_hashes=False).encode(texts, prompt="query: ")
    assert same_bits(vectors, ref[cols["id"]]).all()
    plain = Encoder(minilm_artifact, check_hashes=False).encode([texts[i] for i in cols["id"][:5]])
    assert not same_bits(vectors[:5], plain).any()  # the prompt changed the vectors


def test_unknown_prompt_name_fails_before_ray_work(local_ray, corpus, minilm_artifact, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown prompt name 'nope'"):
        embed_files_to_parquet(corpus[1], minilm_artifact, tmp_path / "never", num_actors=1, prompt_name="nope")
    assert not (tmp_path / "never").exists()


def test_text_files_give_the_lines_the_cli_reads(local_ray, tmp_path) -> None:
    """One row per line as `stableembed embed -i` reads it: split on \\n only, \\r\\n endings dropped; a form
    feed, a lone \\r, U+2028 or U+0085 stay in their text (str.splitlines would start new rows there)."""
    from stableembed.serve.ray_data import read_texts
    from stableembed.streaming import read_lines, split_lines

    raw = "first\x0csecond half\r\nline with a lone \r inside\nU+2028 \u2028 and \x85 here\n   \n\nlast\r"
    path = tmp_path / "tricky.txt"
    path.write_bytes(raw.encode("utf-8-sig"))  # a leading byte-order mark is dropped, as by the CLI
    with read_lines(str(path)) as lines:
        expected = list(lines)
    assert expected == split_lines(raw) == ["first\x0csecond half", "line with a lone \r inside",
                                            "U+2028 \u2028 and \x85 here", "   ", "", "last\r"]
    rows = read_texts(str(path), include_paths=True).take_all()
    assert [r["text"] for r in rows] == expected
    assert {r["path"] for r in rows} == {str(path)}
    kept = [r["text"] for r in read_texts(str(path), drop_empty_lines=True).take_all()]
    assert kept == [t for t in expected if t] and "   " in kept  # whitespace is a text, not an empty line
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(Exception, match=r"latin1\.txt: not UTF-8"):
        read_texts(str(bad)).take_all()


def test_embed_batches_names_a_missing_text_column_and_refuses_to_shadow_one(minilm_artifact) -> None:
    """Checked per batch, without a cluster: an input column named like the output would be duplicated."""
    import pyarrow as pa

    from stableembed.serve.ray_data import EmbedBatches

    fn = EmbedBatches(str(minilm_artifact))
    out = fn(pa.table({"text": ["a", "b"], "id": [1, 2]}))
    assert out.column_names == ["text", "id", "embedding"]
    with pytest.raises(ValueError, match="already has a column 'embedding'; pass another output_column"):
        fn(out)
    with pytest.raises(ValueError, match=r"no column 'text' \(its columns: body, id\); pass text_column"):
        fn(pa.table({"body": ["a"], "id": [1]}))

"""Prompts (sentence-transformers' `prompts`, `default_prompt_name`, Pooling's `include_prompt`): read
into the manifest, chosen as sentence-transformers' `encode` chooses them, parity with its
`encode(..., prompt_name=...)`, and bit-stability of prompted texts whatever the batch.

Models: tiny random-weight BERTs with prompts (prompt_models.py); "excluded" concatenates every pooling
mode with include_prompt=false, so each mode's handling of the prompt's tokens is compared."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import onnx
import pytest
from prompt_models import EXCLUDED_MODES, PROMPTS, prompted_model
from test_parity import MAX_ABS_DIFF, MIN_COSINE  # the one place the parity tolerances are stated
from tiny_models import HIDDEN, build_st_folder, corpus

from stableembed import Encoder
from stableembed.export import read_source
from stableembed.export.parity import cosine_rows
from stableembed.runtime.encoder import _Request
from stableembed.runtime.manifest import load_manifest
from stableembed.runtime.verify import same_bits

pytestmark = pytest.mark.slow  # exports two tiny models (seconds), once per process


def _texts() -> list[str]:
    lines = corpus()
    return ["", "a", "hello world", "The quick brown fox jumps over the lazy dog.",
            "Ünïcödé façade, naïve café — 日本語のテキスト 🚀 مرحبا", lines[3], lines[200], lines[501],
            " ".join(lines[-40:])]  # far beyond max_length: truncated, prompt included


# (prompt_name, prompt) as passed to both encoders; None, None: the model's default prompt, if any
SETTINGS = [(None, None), ("query", None), ("document", None), ("instruct", None), ("empty", None),
            (None, "a prompt of our own: "), ("document", "wins over the name: "), (None, "")]


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = SentenceTransformer(str(prompted_model(name)[0]), device="cpu")
        return cache[name]

    return get


def test_manifest_reads_prompts_and_include_prompt() -> None:
    for name, default, include in (("default", "query", True), ("excluded", None, False)):
        art = prompted_model(name)[1]
        m = load_manifest(art)
        assert m.prompts == PROMPTS and m.default_prompt_name == default and m.include_prompt is include
        # a tiny BERT: the CPU provider runs the fused graph (format 3), with the same inputs as model.onnx
        assert m.raw["format_version"] == 3 and m.cpu_model_file is not None
        expected = ["input_ids", "attention_mask", "token_type_ids"] + ([] if include else ["pooling_mask"])
        for graph in (m.model_file, m.cpu_model_file):
            graph_inputs = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
            assert list(m.inputs) == graph_inputs == expected  # no extra input unless the prompt is excluded
        assert Encoder(art).prompts == PROMPTS
    parity = load_manifest(prompted_model("default")[1]).raw["parity"]  # export applied the default prompt
    assert parity["min_cosine"] >= MIN_COSINE and parity["max_abs_diff"] <= MAX_ABS_DIFF, parity


def test_source_without_prompts_and_bad_default(tmp_path) -> None:
    hf = prompted_model("default")[0]  # a folder with the transformer files
    plain = build_st_folder(hf, tmp_path / "plain", ["mean"])
    (plain / "config_sentence_transformers.json").unlink(missing_ok=True)
    src = read_source(plain)
    assert src.prompts == {} and src.default_prompt_name is None and src.include_prompt is True
    (plain / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "q: "}, "default_prompt_name": "passage"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"default_prompt_name 'passage' is not one of the prompts \('query'\)"):
        read_source(plain)


@pytest.mark.parametrize("model", ["default", "excluded"])
@pytest.mark.parametrize("prompt_name, prompt", SETTINGS)
def test_parity_with_sentence_transformers_encode(model, prompt_name, prompt, st_model) -> None:
    texts = _texts()
    ref = st_model(model).encode(texts, prompt_name=prompt_name, prompt=prompt, batch_size=4,
                                 convert_to_numpy=True)
    with pytest.warns(UserWarning, match="using prompt") if prompt_name and prompt else nullcontext():
        ours = Encoder(prompted_model(model)[1]).encode(texts, prompt_name=prompt_name, prompt=prompt)
    assert ours.shape == ref.shape
    if model == "excluded":  # each pooling mode on its own, prompt tokens left out of each
        width = HIDDEN
        for k, mode in enumerate(EXCLUDED_MODES):
            part = slice(k * width, (k + 1) * width)
            assert cosine_rows(ours[:, part], ref[:, part]).min() >= MIN_COSINE, mode
            assert np.abs(ours[:, part] - ref[:, part]).max() <= MAX_ABS_DIFF, mode
    assert cosine_rows(ours, ref).min() >= MIN_COSINE
    assert np.abs(ours - ref).max() <= MAX_ABS_DIFF


def test_prompts_change_the_embedding_and_exclusion_matters(st_model) -> None:
    """The parity test could pass vacuously if prompts did nothing: check that they do."""
    texts = _texts()[2:6]
    for model in ("default", "excluded"):
        enc = Encoder(prompted_model(model)[1])
        none, query = enc.encode(texts, prompt=""), enc.encode(texts, prompt_name="instruct")
        assert (cosine_rows(none, query) < 0.999).all()
    # the default prompt is "query": encode() == encode(prompt_name="query") != no prompt
    enc = Encoder(prompted_model("default")[1])
    assert same_bits(enc.encode(texts), enc.encode(texts, prompt_name="query")).all()
    assert not same_bits(enc.encode(texts), enc.encode(texts, prompt="")).any()
    # include_prompt=false: the mean over text tokens only differs from the mean over all tokens
    st = st_model("excluded")
    st.set_pooling_include_prompt(True)
    try:
        included = st.encode(texts, prompt_name="instruct", convert_to_numpy=True)
    finally:
        st.set_pooling_include_prompt(False)
    ours = Encoder(prompted_model("excluded")[1]).encode(texts, prompt_name="instruct")
    mean = slice(HIDDEN, 2 * HIDDEN)
    assert (cosine_rows(ours[:, mean], included[:, mean]) < 0.9999).all()


def test_prompt_length_counts_as_sentence_transformers(st_model) -> None:
    enc = Encoder(prompted_model("excluded")[1])
    module = st_model("excluded")[0]
    for prompt in [*PROMPTS.values(), "x", "🚀 " * 200]:  # the last: longer than max_length, truncated
        expected = module._get_prompt_length(prompt) if prompt else 0
        assert enc.tokenizer.prompt_length(prompt) == expected, prompt
    # a model that pools the prompt needs no count
    assert Encoder(prompted_model("default")[1]).tokenizer.prompt_length("query: ") == 0


def test_unknown_prompt_name_is_a_clear_error_and_the_encoder_keeps_working() -> None:
    enc = Encoder(prompted_model("default")[1])
    with pytest.raises(ValueError, match=r"unknown prompt name 'nope'; this model's prompts: 'query', "
                                         r"'document', 'instruct', 'empty'"):
        enc.encode(["a text"], prompt_name="nope")
    with pytest.raises(ValueError, match="unknown prompt name"):
        enc.encode_stream(["a text"], prompt_name="nope")  # raises at the call, before reading any text
    with pytest.raises(TypeError, match="prompt must be a str"):
        enc.encode(["a text"], prompt=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^prompt cannot be encoded as UTF-8 \(surrogates not allowed at character 5\)"):
        enc.encode(["a fine text", "another"], prompt="query\ud800: ")  # the prompt's fault, not text 0's
    assert enc.encode(["a text"], prompt_name="document").shape == (1, enc.dim)


def test_builtin_query_and_document_names_on_a_model_without_prompts(tiny_zoo_free_artifact) -> None:
    """sentence-transformers 6 accepts "query" and "document" on every model (empty prompts): so do we."""
    enc = Encoder(tiny_zoo_free_artifact)
    plain = enc.encode(["some text", "another"])
    for name in ("query", "document"):
        assert same_bits(enc.encode(["some text", "another"], prompt_name=name), plain).all()
    with pytest.raises(ValueError, match=r"this model's prompts: 'query', 'document'$"):
        enc.encode(["x"], prompt_name="passage")


@pytest.fixture(scope="module")
def tiny_zoo_free_artifact(tmp_path_factory):
    """A prompt-free artifact of the same tiny BERT (mean pooling, no config_sentence_transformers.json)."""
    from stableembed import export_model

    root = tmp_path_factory.mktemp("noprompt")
    src = build_st_folder(prompted_model("default")[0], root / "src", ["mean"])
    (src / "config_sentence_transformers.json").unlink(missing_ok=True)
    export_model(src, root / "art", parity=False)
    m = load_manifest(root / "art")
    assert m.prompts == {} and m.raw["format_version"] == 3 and "pooling_mask" not in m.inputs
    return root / "art"


def _stability_texts() -> list[str]:
    rng = random.Random(5)
    lines = corpus()
    return _texts() + rng.sample(lines, 16) + [" ".join(rng.sample(lines, k)) for k in (2, 4, 9)]


@pytest.mark.parametrize("model, prompt_name", [("default", None), ("default", "instruct"),
                                                ("excluded", "instruct"), ("excluded", "query")])
def test_prompted_texts_are_bit_identical_in_any_batch(model, prompt_name) -> None:
    art = prompted_model(model)[1]
    texts = _stability_texts()
    kw = {"prompt_name": prompt_name}
    alone_enc = Encoder(art, threads=1)
    alone = np.stack([alone_enc.encode(t, **kw) for t in texts])
    rng = random.Random(3)
    failures = []
    for mode in ("dynamic", "fixed"):
        for threads in (1, 2):
            enc = Encoder(art, mode=mode, threads=threads, check_hashes=False)
            runs = [(bs, len(texts)) for bs in (1, 3, 8, 32)] if mode == "dynamic" else \
                [(32, n) for n in (len(texts), 9, 2)]
            for batch_size, n in runs:
                order = rng.sample(range(len(texts)), n)
                out = enc.encode([texts[i] for i in order], batch_size=batch_size, **kw)
                same = same_bits(out, alone[order])
                if not same.all():
                    failures.append(f"{mode}, {threads} thread(s), batch {batch_size}: rows "
                                    f"{[order[j] for j in np.flatnonzero(~same)]}")
    assert not failures, "\n".join(failures)
    # encode_stream, in small chunks, gives the same bits
    stream = np.concatenate(list(alone_enc.encode_stream(iter(texts), chunk_size=5, **kw)))
    assert same_bits(stream, alone).all()


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_different_prompts_share_one_batch_bit_identically(mode) -> None:
    """Concurrent calls with different prompts are merged into common batches (flat combining): rows with
    different prompt lengths in one padded batch must keep their own bits. Two requests are run as one
    round, deterministically, and the backend's feeds are recorded to show they shared a batch."""
    art = prompted_model("excluded")[1]
    enc = Encoder(art, mode=mode, threads=2)
    texts_a, texts_b = _texts()[1:5], _texts()[4:8]
    alone_a = np.stack([enc.encode(t, prompt_name="instruct") for t in texts_a])
    alone_b = np.stack([enc.encode(t, prompt="") for t in texts_b])
    feeds_seen = []
    run = enc.backend.run

    def spy(feeds):
        feeds_seen.append({k: v.copy() for k, v in feeds.items()})
        return run(feeds)

    enc.backend.run = spy  # type: ignore[method-assign]
    tok = enc.tokenizer
    req_a = _Request(tok.encode(texts_a, prompt=PROMPTS["instruct"]), 32, np.empty((4, enc.dim), np.float32),
                     tok.prompt_length(PROMPTS["instruct"]))
    req_b = _Request(tok.encode(texts_b), 32, np.empty((4, enc.dim), np.float32), 0)
    enc._run([req_a, req_b])
    assert req_a.error is None and req_b.error is None
    assert same_bits(req_a.out, alone_a).all() and same_bits(req_b.out, alone_b).all()
    cleared = req_a.prompt_length
    assert cleared > 3
    shared = [f for f in feeds_seen
              if ((f["attention_mask"][:, :cleared] == 1) & (f["pooling_mask"][:, :cleared] == 0)).all(1).any()
              and (f["pooling_mask"][:, 1] == 1).any()]
    assert shared, "no batch held rows with and without a prompt"
    # and through threads, as users call it (futures: an exception in a thread fails the test)
    with ThreadPoolExecutor(2) as pool:
        fut_a = pool.submit(enc.encode, texts_a, prompt_name="instruct")
        fut_b = pool.submit(enc.encode, texts_b)
        assert same_bits(fut_a.result(), alone_a).all() and same_bits(fut_b.result(), alone_b).all()


def test_same_tokens_with_another_prompt_length_are_not_merged() -> None:
    """Identical rows in one round run once (runtime/encoder.py, _distinct_rows), but a text that
    spells the prompt out itself has the prompted text's tokens and pools over all of them: the two must
    stay two rows, each with its own bits."""
    art = prompted_model("excluded")[1]
    enc = Encoder(art, threads=2)
    prompt, texts = PROMPTS["instruct"], _texts()[1:5]
    tok = enc.tokenizer
    prompted = tok.encode(texts, prompt=prompt)
    typed = tok.encode([prompt + t for t in texts])
    assert [e.ids for e in prompted] == [e.ids for e in typed]  # else this test shows nothing
    req_a = _Request(prompted, 32, np.empty((4, enc.dim), np.float32), tok.prompt_length(prompt))
    req_b = _Request(typed, 32, np.empty((4, enc.dim), np.float32), 0)
    enc._run([req_a, req_b])
    assert req_a.error is None and req_b.error is None
    alone_a = np.stack([enc.encode(t, prompt=prompt) for t in texts])
    alone_b = np.stack([enc.encode(prompt + t, prompt="") for t in texts])
    assert same_bits(req_a.out, alone_a).all() and same_bits(req_b.out, alone_b).all()
    assert not same_bits(alone_a, alone_b).any()  # no row of one equals its twin of the other


def test_int8_export_keeps_the_pooling_mask_and_the_guarantee(tmp_path) -> None:
    from stableembed import export_model

    src, fp32 = prompted_model("excluded")
    m = export_model(src, tmp_path / "int8", precision="int8", parity=False)
    assert m.inputs == load_manifest(fp32).inputs and "pooling_mask" in m.inputs
    texts = _stability_texts()[:14]
    alone_enc = Encoder(tmp_path / "int8", threads=1)
    alone = np.stack([alone_enc.encode(t, prompt_name="instruct") for t in texts])
    for mode, threads in (("dynamic", 2), ("fixed", 1)):
        out = Encoder(tmp_path / "int8", mode=mode, threads=threads).encode(texts[::-1], prompt_name="instruct",
                                                                             batch_size=5)
        assert same_bits(out[::-1], alone).all(), mode
    # close to float32 (the int8 quality bar is the int8 tests'; here: the prompt is handled the same way)
    ref = Encoder(fp32).encode(texts, prompt_name="instruct")
    assert cosine_rows(alone, ref).min() > 0.99


@pytest.mark.parametrize("edit, message", [
    ({"include_prompt": True}, "include_prompt=false goes with a pooling_mask input"),
    ({"default_prompt_name": "nope"}, "default_prompt_name 'nope' is not one of the prompts"),
    ({"prompts": {"query": 3}}, "prompts must map names to strings"),
])
def test_inconsistent_prompt_fields_are_refused(edit, message, tmp_path) -> None:
    import shutil

    from stableembed.runtime.manifest import ArtifactError

    art = tmp_path / "art"
    shutil.copytree(prompted_model("excluded")[1], art)
    raw = json.loads((art / "manifest.json").read_text(encoding="utf-8"))
    raw.update(edit)
    (art / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ArtifactError, match=message):
        load_manifest(art)

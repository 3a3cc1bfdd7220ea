"""Export tiny random-weight models of several architectures and heads; check graph, parity and stability.

Every model is built here from a config (no hub access), exported once (see conftest.py's `tiny_zoo`),
then checked three ways: the graph's inputs and output, parity with sentence-transformers loaded from
the same folder, and the stability guarantee bit for bit (each text alone == in any batch, shuffled,
fixed or dynamic, 1 or 2 threads).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from stableembed import Encoder, export_model
from stableembed.export.parity import PARITY_TOLERANCE, cosine_rows
from stableembed.runtime.manifest import load_manifest
from stableembed.runtime.verify import same_bits
from tiny_models import ARCHS, POSITIONS, Case, build_st_folder, corpus

MIN_COSINE, MAX_ABS_DIFF = PARITY_TOLERANCE

ARCH_CASES = [Case(f"{a}-mean-normalize", arch=a, normalize=True) for a in ARCHS]
HEAD_CASES = [  # heads share one architecture (BERT) to keep the run short
    *(Case(f"bert-{m}", pooling=(m,)) for m in ("cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")),
    Case("bert-cls+mean", pooling=("cls", "mean")),
    Case("bert-mean_sqrt_len-mode-key", pooling=("mean_sqrt_len_tokens",), pooling_format="mode"),
    Case("bert-dense-tanh-normalize", dense=((24, "Tanh"),), normalize=True),
    Case("bert-cls+mean-2dense", pooling=("cls", "mean"), dense=((48, "ReLU"), (16, "Identity"))),
    # saved by sentence-transformers itself: new module paths, `pooling_mode` list in a non-canonical order
    Case("bert-st-saved", layout="st-saved", pooling=("mean", "cls"), dense=((24, "Tanh"),), normalize=True),
    Case("bert-plain", layout="plain"),
    Case("xlm-roberta-plain", arch="xlm-roberta", layout="plain"),
]
CASES = ARCH_CASES + HEAD_CASES
CASE_IDS = [c.id for c in CASES]

def _case_param(case: Case):
    return pytest.param(case, id=case.id)


def parity_texts() -> list[str]:
    lines = corpus()
    long_text = " ".join(lines[-40:])  # far beyond max_length tokens: truncated
    return ["", "a", "hello world", "The quick brown fox jumps over the lazy dog.",
            "Ünïcödé façade, naïve café — 日本語のテキスト 🚀🔥 مرحبا بالعالم e\u0301", "x\x00y",
            lines[3], lines[200], long_text]


def stability_texts() -> list[str]:
    """Lengths spread over every fixed bucket (16, 32, 64, 128) and beyond max_length."""
    rng = random.Random(7)
    lines = corpus()
    picked = rng.sample(lines, 20)
    joined = [" ".join(rng.sample(lines, k)) for k in (2, 3, 5, 12)]
    return parity_texts() + picked + joined


@pytest.fixture(scope="module")
def st_reference():
    """sentence-transformers' embeddings for a folder, one text at a time (no padding involved)."""
    from sentence_transformers import SentenceTransformer

    cache: dict[tuple[Path, tuple[str, ...]], tuple[np.ndarray, int]] = {}

    def embed(folder: Path, texts: list[str]) -> tuple[np.ndarray, int]:
        key = (folder, tuple(texts))
        if key not in cache:
            model = SentenceTransformer(str(folder), device="cpu")
            emb = np.stack([model.encode([t], convert_to_numpy=True)[0] for t in texts]).astype(np.float32)
            cache[key] = (emb, int(model.max_seq_length))
        return cache[key]

    return embed


def _graph_inputs(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_graph_inputs_and_output(case: Case, tiny_zoo) -> None:
    import onnx
    import onnxruntime as ort

    art, _ = tiny_zoo.artifact(case)
    manifest = load_manifest(art)
    arch = ARCHS[case.arch]
    config = json.loads((tiny_zoo.transformers(case.arch) / "config.json").read_text(encoding="utf-8"))
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch.uses_token_types else [])
    # the expectation agrees with the rule: type_vocab_size > 1 and the forward takes token_type_ids
    assert arch.uses_token_types == (int(config.get("type_vocab_size") or 0) > 1)

    model = onnx.load(str(art / "model.onnx"))
    assert _graph_inputs(model) == expected
    assert list(manifest.inputs) == expected
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[0].dim_param and dims[1].dim_value == manifest.dim

    heads = len(case.pooling)
    expected_dim = case.dense[-1][0] if case.dense else 32 * heads
    assert manifest.dim == expected_dim
    assert manifest.normalize == case.normalize
    assert manifest.max_length == POSITIONS

    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {n: np.ones((3, 7), dtype=np.int64) for n in expected}
    feeds["input_ids"] = np.full((3, 7), 5, dtype=np.int64)
    if "token_type_ids" in feeds:
        feeds["token_type_ids"][:] = 0
    out = sess.run(["sentence_embedding"], feeds)[0]
    assert out.shape == (3, manifest.dim) and out.dtype == np.float32


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_parity_with_sentence_transformers(case: Case, tiny_zoo, st_reference) -> None:
    art, _ = tiny_zoo.artifact(case)
    texts = parity_texts()
    ref, st_max_length = st_reference(tiny_zoo.source(case), texts)
    enc = Encoder(art)
    assert enc.max_length == st_max_length, "export chose a different max_length than sentence-transformers"
    assert len(enc.tokenizer.encode([texts[-1]])[0].ids) == enc.max_length  # the long text is truncated
    ours = enc.encode(texts)
    assert ours.shape == ref.shape
    cos = cosine_rows(ours, ref)
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max(axis=1)
    worst = int(np.argmin(cos))
    assert cos.min() >= MIN_COSINE, f"min cosine {cos.min()} on text {texts[worst][:60]!r}"
    assert diff.max() <= MAX_ABS_DIFF, f"max abs diff {diff.max()} on text {texts[int(np.argmax(diff))][:60]!r}"
    if case.normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("case", [_case_param(c) for c in ARCH_CASES])
def test_recorded_parity(case: Case, tiny_zoo) -> None:
    """The figures export_model measured on the bundled sample (which has whitespace-padded lines)."""
    art, _ = tiny_zoo.artifact(case)
    parity = load_manifest(art).raw["parity"]
    assert parity["texts"] > 10
    assert parity["min_cosine"] >= MIN_COSINE and parity["max_abs_diff"] <= MAX_ABS_DIFF, parity


@pytest.mark.parametrize("case", [_case_param(c) for c in ARCH_CASES])
def test_parity_surrounding_whitespace(case: Case, tiny_zoo, st_reference) -> None:
    texts = ["  leading spaces", "trailing spaces   ", "\ttabs\t", " both sides ", "inner   spaces stay"]
    art, _ = tiny_zoo.artifact(case)
    ref, _ = st_reference(tiny_zoo.source(case), texts)
    ours = Encoder(art).encode(texts)
    assert cosine_rows(ours, ref).min() >= MIN_COSINE


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_stability_bit_exact(case: Case, tiny_zoo) -> None:
    art, _ = tiny_zoo.artifact(case)
    texts = stability_texts()
    ref_enc = Encoder(art, mode="dynamic", threads=1)
    alone = np.stack([ref_enc.encode(t) for t in texts])
    assert np.isfinite(alone).all()
    rng = random.Random(11)
    failures = []
    for mode in ("dynamic", "fixed"):
        for threads in (1, 2):
            enc = Encoder(art, mode=mode, threads=threads, check_hashes=False)
            # fixed mode takes its batch sizes from the buckets: vary the number of texts instead
            runs = [(bs, len(texts)) for bs in (1, 3, 8, 32)] if mode == "dynamic" else \
                [(32, n) for n in (len(texts), 11, 5, 1)]
            for batch_size, n in runs:
                order = rng.sample(range(len(texts)), n)
                out = enc.encode([texts[i] for i in order], batch_size=batch_size)
                same = same_bits(out, alone[order])
                if not same.all():
                    bad = [order[j] for j in np.flatnonzero(~same)]
                    failures.append(f"{mode}, {threads} thread(s), batch {batch_size}, {n} texts: rows {bad}")
    assert not failures, "\n".join(failures)


def test_unsupported_module_is_named(tiny_zoo, tmp_path: Path) -> None:
    folder = build_st_folder(tiny_zoo.transformers("bert"), tmp_path / "src", ("mean",), normalize=True)
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LSTM", "type": "sentence_transformers.models.LSTM"})
    (folder / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=r"sentence_transformers\.models\.LSTM"):
        export_model(folder, out, parity=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("config, message", [
    ({"in_features": 32, "out_features": 8, "use_residual": True}, "use_residual"),
    ({"in_features": 32, "out_features": 8, "module_input_name": "token_embeddings"}, "module_input_name"),
    ({"in_features": 32, "out_features": 8, "activation_function": "my.custom.Act"}, "my.custom.Act"),
])
def test_unsupported_dense_options_are_named(config: dict, message: str, tiny_zoo, tmp_path: Path) -> None:
    folder = build_st_folder(tiny_zoo.transformers("bert"), tmp_path / "src", ("mean",), dense=((8, "Tanh"),))
    (folder / "2_Dense" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        export_model(folder, tmp_path / "art", parity=False)


@pytest.mark.slow  # torch.export + onnxscript: over 20 s on 2 busy cores
def test_dynamo_exporter(tiny_zoo, st_reference) -> None:
    case = Case("bert-cls+mean-dynamo", pooling=("cls", "mean"), normalize=True, exporter="dynamo")
    art, seconds = tiny_zoo.artifact(case)
    manifest = load_manifest(art)
    assert manifest.raw["exporter"] == "dynamo"
    assert list(manifest.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    texts = parity_texts()
    ref, _ = st_reference(tiny_zoo.source(case), texts)
    ours = Encoder(art).encode(texts)
    assert cosine_rows(ours, ref).min() >= MIN_COSINE
    assert np.abs(ours - ref).max() <= MAX_ABS_DIFF
    alone = np.stack([Encoder(art, threads=1).encode(t) for t in stability_texts()])
    for mode, threads in (("dynamic", 2), ("fixed", 1)):
        batched = Encoder(art, mode=mode, threads=threads).encode(stability_texts(), batch_size=8)
        assert same_bits(batched, alone).all(), (mode, threads)

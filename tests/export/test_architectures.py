"""Export tiny random-weight models of several architectures and heads; check graph, parity and stability.

Every model is built here from a config (no hub access), exported once (see conftest.py's `tiny_zoo`),
then checked three ways: the graph's inputs and output, parity with sentence-transformers loaded from
the same folder, and the stability guarantee bit for bit (each text alone == in any batch, shuffled,
fixed or dynamic, 1 or 2 threads).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from stableembed import Encoder, export_model
from stableembed.export.parity import PARITY_TOLERANCE, cosine_rows
from stableembed.runtime.manifest import load_manifest
from stableembed.runtime.verify import same_bits
from tiny_models import ARCHS, POSITIONS, Case, build_st_folder, corpus

MIN_COSINE, MAX_ABS_DIFF = PARITY_TOLERANCE

# each architecture with its family's published head (mean for the encoders, last token for the decoders,
# mean + two Dense for Gemma3), then Normalize
ARCH_CASES = [Case(f"{a}-{'+'.join(arch.pooling)}{'-dense' if arch.dense else ''}-normalize", arch=a,
                   pooling=arch.pooling, dense=arch.dense, normalize=True) for a, arch in ARCHS.items()]
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
            # trust_remote_code: the custom-code case runs the code the test wrote into its folder
            model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True, local_files_only=True)
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
    assert np.abs(ours.astype(np.float64) - ref).max() <= MAX_ABS_DIFF


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


def test_family_exporter_is_recorded(tiny_zoo) -> None:
    """Each family exports with its own exporter unless told otherwise; the manifest records which, and the
    family the architecture was recognized as."""
    import onnx

    from stableembed.export.families import FAMILIES, family_for

    for case in ARCH_CASES:
        art, _ = tiny_zoo.artifact(case)
        raw = load_manifest(art, check_hashes=False).raw
        config = json.loads((tiny_zoo.transformers(case.arch) / "config.json").read_text(encoding="utf-8"))
        family = family_for(config, trust_remote_code=ARCHS[case.arch].remote_code)
        assert raw["exporter"] == family.exporter and raw["architecture"]["family"] == family.name, case.id
        assert raw["architecture"]["remote_code"] == ARCHS[case.arch].remote_code
        graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
        assert raw["opset"] == next(o.version for o in graph.opset_import if o.domain == "")  # gemma3: 18
    assert {f.name for f in FAMILIES} >= {"Qwen3", "Qwen2", "Gemma3 (text)", "ModernBERT"}


def test_unsupported_architecture_is_refused(tiny_zoo, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_zoo.transformers("bert"), folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="gpt2", architectures=["GPT2Model"])
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=r"'gpt2' \(GPT2Model\) is not supported.*bert.*gemma3_text.*modernbert.*qwen3"):
        export_model(folder, out, parity=False)
    assert not out.exists()


def _with_config(tiny_zoo, tmp_path: Path, arch: str, **changes) -> Path:
    folder = tmp_path / arch
    shutil.copytree(tiny_zoo.transformers(arch), folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("arch,changes,max_length,message", [
    # transformers rescales dynamic rope past max_position_embeddings with a Python branch the trace cannot keep
    # (measured before this check: min cosine 0.877 against sentence-transformers)
    ("qwen3", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32), 64,
     r"rope type 'dynamic' rescales .* longer than max_position_embeddings \(32 tokens\).*max_length .*<= 32"),
    ("qwen2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                   max_position_embeddings=32), 64, "rope type 'dynamic'"),
    ("qwen3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                 "original_max_position_embeddings": 32}), 32, "rope type 'longrope' is not supported"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "longrope"},
                                     "sliding_attention": {"rope_type": "default"}}), 32, "'longrope'"),
    # transformers 5 implements absolute positions only: a relative-position checkpoint would run as another model
    ("bert", dict(position_embedding_type="relative_key_query"), 32,
     "position_embedding_type 'relative_key_query' is not supported"),
])
def test_positions_a_trace_would_get_wrong_are_refused(tiny_zoo, tmp_path: Path, arch, changes, max_length,
                                                       message) -> None:
    folder = _with_config(tiny_zoo, tmp_path, arch, **changes)
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=message):
        export_model(folder, out, parity=False, max_length=max_length)
    assert not out.exists()


def test_dynamic_rope_within_the_position_table_is_exported(tiny_zoo, tmp_path: Path) -> None:
    """Up to max_position_embeddings dynamic rope is the unscaled rotation, which the trace keeps."""
    folder = _with_config(tiny_zoo, tmp_path, "qwen3", rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                          max_position_embeddings=32)
    manifest = export_model(folder, tmp_path / "art", max_length=32)
    assert PARITY_TOLERANCE.accepts(manifest.raw["parity"]), manifest.raw["parity"]


def test_remote_code_needs_the_flag(tiny_zoo, tmp_path: Path, capsys) -> None:
    from stableembed.cli import main

    src = tiny_zoo.source(next(c for c in ARCH_CASES if c.arch == "custom"))
    out = tmp_path / "art"
    with pytest.raises(ValueError, match=r"modeling_tiny_custom\.TinyCustomModel.*trust_remote_code=True "
                                         r"\(--trust-remote-code\)"):
        export_model(src, out, parity=False)
    assert main(["export", str(src), str(out), "--no-parity"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not out.exists()


def test_remote_code_only_from_the_folder(tiny_zoo, tmp_path: Path) -> None:
    """With the flag, code named outside the folder (another repository, a missing file) is still refused."""
    base = tiny_zoo.transformers("custom")
    for ref, message in (("someone/other-repo--modeling_tiny_custom.TinyCustomModel", "another repository"),
                         ("modeling_elsewhere.TinyCustomModel", "modeling_elsewhere.py, which is not in the model")):
        folder = tmp_path / message.split()[0].replace(".", "_")
        shutil.copytree(base, folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["auto_map"]["AutoModel"] = ref
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            export_model(folder, tmp_path / "art", parity=False, trust_remote_code=True)


def test_cli_trust_remote_code_flag(tiny_zoo, tmp_path: Path) -> None:
    from stableembed.cli import main

    src = tiny_zoo.source(next(c for c in ARCH_CASES if c.arch == "custom"))
    out = tmp_path / "art"
    assert main(["export", str(src), str(out), "--trust-remote-code", "--no-parity"]) == 0
    raw = load_manifest(out).raw
    assert raw["architecture"]["remote_code"] is True and raw["architecture"]["model_type"] == "tiny-custom-encoder"


@pytest.mark.parametrize("case", [_case_param(c) for c in ARCH_CASES])
def test_hidden_states_batch_and_padding_invariant(case: Case, tiny_zoo) -> None:
    """The transformer's own output (before our kernels) for real tokens, per family: each text alone vs in a
    batch with companions and extra padding, 1 and 2 threads, compared bit for bit. This is what lets the
    pooling kernels alone carry the guarantee (rotary, causal / sliding-window masks, GQA, RMSNorm included)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    art, _ = tiny_zoo.artifact(case)
    manifest = load_manifest(art, check_hashes=False)
    model = onnx.load(str(art / "model.onnx"))
    model.graph.output.append(helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, None))
    enc = Encoder(art, check_hashes=False)
    ids = [e.ids for e in enc.tokenizer.encode(stability_texts())]
    ids = [seq for seq in ids if len(seq) <= manifest.max_length // 2][:12]
    length = manifest.max_length  # padding of max_length // 2 tokens or more on every row
    feeds = {n: np.zeros((len(ids), length), dtype=np.int64) for n in manifest.inputs}
    feeds["input_ids"][:] = manifest.pad_id
    for row, seq in enumerate(ids):
        feeds["input_ids"][row, :len(seq)] = seq
        feeds["attention_mask"][row, :len(seq)] = 1
    for threads in (1, 2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        batched = sess.run(["token_embeddings"], feeds)[0]
        for row, seq in enumerate(ids):
            alone = sess.run(["token_embeddings"], {n: v[row:row + 1, :len(seq)] for n, v in feeds.items()})[0][0]
            assert same_bits(batched[row, :len(seq)], alone).all(), (threads, row, len(seq))


NEW_FAMILY_CASES = [c for c in ARCH_CASES if c.arch in ("qwen3", "qwen2", "gemma3", "modernbert", "custom")]
INT8_MIN_COSINE = 0.99  # int8 vs the family's fp32 artifact, per text, on the tiny random models


@pytest.mark.slow  # one more export (with calibration) per family
@pytest.mark.parametrize("case", [_case_param(c) for c in NEW_FAMILY_CASES])
def test_int8_bit_exact(case: Case, tiny_zoo, tmp_path: Path) -> None:
    """int8 export of each new family: every constant-weight MatMul quantized per row, each text bit-identical
    whatever the batch (dynamic and fixed, 1 and 2 threads), and close to the family's fp32 artifact."""
    fp32, _ = tiny_zoo.artifact(case)
    out = tmp_path / "int8"
    export_model(tiny_zoo.source(case), out, precision="int8", parity=False,
                 trust_remote_code=ARCHS[case.arch].remote_code)
    q = load_manifest(out).raw["quantization"]
    assert q["quantized_matmuls"] >= 4 * 2, q  # at least q, k, v, o of each layer
    assert all(n.startswith("stableembed/dense") for n in q["kept_fp32"]), q["kept_fp32"]  # only the Dense head
    texts = stability_texts()
    one = Encoder(out, threads=1)
    alone = np.stack([one.encode(t) for t in texts])
    cos = cosine_rows(alone, Encoder(fp32).encode(texts))
    assert cos.min() >= INT8_MIN_COSINE, f"int8 vs fp32: min cosine {cos.min()}, mean {cos.mean()}"
    for mode, threads, batch_size in (("dynamic", 2, 8), ("dynamic", 1, 32), ("fixed", 2, 32)):
        order = random.Random(threads).sample(range(len(texts)), len(texts))
        batched = Encoder(out, mode=mode, threads=threads).encode([texts[i] for i in order], batch_size=batch_size)
        assert same_bits(batched, alone[order]).all(), (mode, threads)


def test_decoder_parity_with_left_padded_batches(tiny_zoo) -> None:
    """Qwen-style tokenizers pad on the left in sentence-transformers, so a short text's positions shift with
    the batch; rotary attention is relative, so our right-padded, as-if-alone result stays within parity."""
    from sentence_transformers import SentenceTransformer

    case = next(c for c in ARCH_CASES if c.arch == "qwen3")
    art, _ = tiny_zoo.artifact(case)
    model = SentenceTransformer(str(tiny_zoo.source(case)), device="cpu", local_files_only=True)
    assert model.tokenizer.padding_side == "left"
    texts = parity_texts()
    enc = Encoder(art)
    # the pooled token is the end-of-text token the tokenizer appends, truncated texts included
    assert {e.ids[-1] for e in enc.tokenizer.encode(texts)} == {model.tokenizer.eos_token_id}
    ref = model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    ours = enc.encode(texts)
    assert cosine_rows(ours, ref).min() >= MIN_COSINE
    assert np.abs(ours - ref).max() <= MAX_ABS_DIFF

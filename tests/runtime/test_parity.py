"""Parity with sentence-transformers (torch, fp32) on the same model: the one place with tolerances.

Stated tolerances: PARITY_TOLERANCE (min cosine >= 0.99999 and max |difference| <= 1e-5 per component,
the bounds `stableembed verify --parity` applies), on real texts (short summaries, long paragraphs
beyond max_length, unicode, empty string)."""

from __future__ import annotations

import numpy as np

from stableembed import Encoder
from stableembed.export.parity import PARITY_TOLERANCE, cosine_rows

MIN_COSINE, MAX_ABS_DIFF = PARITY_TOLERANCE


def test_parity_with_sentence_transformers(minilm_dir, minilm_artifact, real_texts) -> None:
    from sentence_transformers import SentenceTransformer

    ref_model = SentenceTransformer(str(minilm_dir), device="cpu")
    assert ref_model.max_seq_length == Encoder(minilm_artifact).max_length == 256
    ref = ref_model.encode(real_texts, batch_size=16, convert_to_numpy=True)
    ours = Encoder(minilm_artifact).encode(real_texts, batch_size=16)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(real_texts), 384)
    assert cosine_rows(ours, ref).min() >= MIN_COSINE
    assert np.abs(ours - ref).max() <= MAX_ABS_DIFF


def test_export_recorded_its_parity(minilm_artifact) -> None:
    p = Encoder(minilm_artifact).manifest.raw["parity"]
    assert p["reference"].startswith("sentence-transformers")
    assert p["texts"] >= 50 and p["min_cosine"] >= MIN_COSINE and p["max_abs_diff"] <= MAX_ABS_DIFF


def test_parity_truncate_dim_and_normalize_with_sentence_transformers(minilm_dir, minilm_artifact,
                                                                      real_texts) -> None:
    """`truncate_dim` and `normalize_embeddings` as sentence-transformers applies them: the first k
    components, then (when asked) L2-normalized; both as Encoder settings and per call."""
    from sentence_transformers import SentenceTransformer

    ref_model = SentenceTransformer(str(minilm_dir), device="cpu", truncate_dim=64)
    enc = Encoder(minilm_artifact)
    for normalize in (False, True):
        ref = ref_model.encode(real_texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=normalize)
        ours = enc.encode(real_texts, batch_size=16, truncate_dim=64, normalize_embeddings=normalize)
        assert ours.shape == ref.shape == (len(real_texts), 64)
        assert cosine_rows(ours, ref).min() >= MIN_COSINE
        assert np.abs(ours - ref).max() <= MAX_ABS_DIFF
        # the truncated rows of a unit-length model are not unit length unless normalized, in both
        assert (np.abs(np.linalg.norm(ours, axis=1) - 1) < 1e-6).all() == normalize
    ref = ref_model.encode(real_texts[:8], normalize_embeddings=True)
    ours = Encoder(minilm_artifact, truncate_dim=64, normalize_embeddings=True).encode(real_texts[:8])
    assert cosine_rows(ours, ref).min() >= MIN_COSINE and np.abs(ours - ref).max() <= MAX_ABS_DIFF

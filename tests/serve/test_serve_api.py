"""The OpenAI-compatible server on the real model, through the official `openai` client and raw HTTP:
formats, `dimensions`, usage, bit-identity with the offline Encoder under concurrent load, OpenAI-shaped
errors, health, readiness and metrics."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import error_of

from stableembed import Encoder
from stableembed.export.parity import cosine_rows
from stableembed.kernels.normalize import normalize_reference
from stableembed.runtime.verify import same_bits
from stableembed.serve import BackgroundServer, ServeConfig, create_app, truncate_dimensions
from stableembed.serve.metrics import Metrics

MODEL = "minilm-test"
CONFIG = ServeConfig(max_inputs=64, max_body_bytes=256 * 1024, max_wait_ms=20)


@pytest.fixture(scope="module")
def server(serve_encoder):
    app = create_app(serve_encoder, CONFIG, model_names=[MODEL, "alias"])
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _metrics(url) -> dict[str, float]:
    """The server's Prometheus samples, name{labels} -> value."""
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _texts(real_texts: list[str]) -> list[str]:
    return [t for t in real_texts if t]  # OpenAI refuses empty strings, and so do we


def test_list_and_str_inputs_default_base64_and_float(client, reference, real_texts) -> None:
    texts = _texts(real_texts)[:40]
    ref = reference(texts)
    # The openai client asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model=MODEL, input=texts)
    assert r.object == "list" and r.model == MODEL and len(r.data) == len(texts)
    assert [d.index for d in r.data] == list(range(len(texts)))
    assert same_bits(np.array([d.embedding for d in r.data], dtype=np.float32), ref).all()
    # Floats in JSON round-trip to the same float32 bits.
    r = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert same_bits(np.array([d.embedding for d in r.data], dtype=np.float32), ref).all()
    # Explicit base64: the raw little-endian float32 bytes.
    r = client.embeddings.create(model=MODEL, input=texts[:3], encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data])
    assert same_bits(got, ref[:3]).all()
    # A single string.
    r = client.embeddings.create(model="alias", input=texts[5], encoding_format="float")
    assert len(r.data) == 1 and r.model == "alias"  # the name the request asked for, as OpenAI echoes it
    assert same_bits(np.array(r.data[0].embedding, dtype=np.float32), ref[5]).all()


def test_usage_counts_tokens(client, serve_encoder) -> None:
    texts = ["a short one", "Ein etwas längerer deutscher Satz mit Umlauten.", "🚀 " * 300]  # last: truncated
    r = client.embeddings.create(model=MODEL, input=texts)
    counts = [len(e.ids) for e in serve_encoder.tokenizer.encode(texts)]
    assert counts[0] == 5 and counts[2] == serve_encoder.max_length  # [CLS] a short one [SEP]; truncated
    expected = sum(counts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected


def test_dimensions_truncate_and_renormalize(client, http, reference, real_texts, serve_encoder) -> None:
    texts = _texts(real_texts)[:10]
    ref = reference(texts)
    for dims in (1, 64, 383):
        r = client.embeddings.create(model=MODEL, input=texts, dimensions=dims)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert got.shape == (len(texts), dims)
        # expected from the kernel's reference, not from the server's own helper: the first `dims`
        # components, renormalized (a wrong slice, last components say, fails here)
        expected = normalize_reference(np.ascontiguousarray(ref[:, :dims]))
        assert same_bits(got, expected).all()
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        cos = cosine_rows(got, ref[:, :dims])  # parallel to the prefix itself
        assert (cos > 1 - 1e-6).all()
        # per row: the truncated vector of a text does not depend on its companions either
        assert same_bits(got[3], truncate_dimensions(ref[3:4], dims, normalize=True)[0]).all()
    full = client.embeddings.create(model=MODEL, input=texts, dimensions=serve_encoder.dim)
    assert same_bits(np.array([d.embedding for d in full.data], dtype=np.float32), ref).all()
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input=texts, dimensions=serve_encoder.dim + 1)
    assert exc.value.status_code == 400 and "dimensions" in str(exc.value)
    for bad in (0, -3, "64", True, 1.5):
        res = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": bad})
        assert res.status_code == 400 and error_of(res)["param"] == "dimensions", bad


def test_concurrent_requests_are_bit_identical_to_offline(server, reference, real_texts) -> None:
    texts = _texts(real_texts)
    ref = reference(texts)
    before = _metrics(server.url)

    def worker(k: int) -> list[str]:
        failures = []
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for j in range(6):
            start = (k * 13 + j * 7) % len(texts)
            n = 1 + (k + j) % 5
            idx = [(start + i) % len(texts) for i in range(n)]
            fmt = "float" if (k + j) % 2 else "base64"
            r = c.embeddings.create(model=MODEL, input=[texts[i] for i in idx], encoding_format=fmt)
            if fmt == "float":
                got = np.array([d.embedding for d in r.data], dtype=np.float32)
            else:
                got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data])
            if got.shape != (n, 384) or not same_bits(got, ref[idx]).all():
                failures.append(f"worker {k} call {j}")
        return failures

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, k) for k in range(8)]
        failures = [f for fut in futures for f in fut.result(timeout=300)]  # a worker's exception surfaces here
    assert failures == []
    after = _metrics(server.url)
    assert after['stableembed_requests_total{status="200"}'] - before['stableembed_requests_total{status="200"}'] == 48


@pytest.mark.parametrize("payload, status, param, fragment", [
    ({"model": MODEL, "input": []}, 400, "input", "empty list"),
    ({"model": MODEL, "input": ""}, 400, "input", "empty string"),
    ({"model": MODEL, "input": ["ok", ""]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": ["ok", 3]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": ["ok", None]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": ["ok", ["nested"]]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": [101, 2023, 102]}, 400, "input", "token-id arrays"),
    ({"model": MODEL, "input": None}, 400, "input", "string or a list"),
    ({"model": MODEL}, 400, "input", "input"),
    ({"model": MODEL, "input": ["t"] * (CONFIG.max_inputs + 1)}, 400, "input", "too many inputs"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format"),
    ({"input": "x"}, 400, "model", "model"),
    ({"model": "gpt-nope", "input": "x"}, 404, "model", "does not exist"),
    (["not", "an", "object"], 400, None, "JSON object"),
])
def test_errors_are_openai_shaped(http, payload, status, param, fragment) -> None:
    res = http.post("/v1/embeddings", json=payload)
    assert res.status_code == status, res.text
    err = error_of(res)
    assert err["param"] == param and fragment in err["message"]
    assert err["type"] == "invalid_request_error"


def test_other_http_errors(http) -> None:
    res = http.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400 and "not valid JSON" in error_of(res)["message"]
    res = http.post("/v1/embeddings", json={"model": MODEL, "input": "x" * (CONFIG.max_body_bytes + 1)})
    assert res.status_code == 413 and error_of(res)["code"] == "request_too_large"
    res = http.post("/v1/embeddings", content=json.dumps({"model": MODEL, "input": "\ud800 lone surrogate"}),
                    headers={"content-type": "application/json"})  # ASCII JSON with a \ud800 escape
    assert res.status_code == 400 and "UTF-8" in error_of(res)["message"]
    deep = b'{"model": "m", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # 10 KB, too deep for json
    res = http.post("/v1/embeddings", content=deep, headers={"content-type": "application/json"})
    assert res.status_code == 400 and "nested too deeply" in error_of(res)["message"]
    res = http.get("/v1/embeddings")
    assert res.status_code == 405 and error_of(res)["code"] == "method_not_allowed"
    assert res.headers["allow"] == "POST"  # HTTP requires it on a 405
    res = http.get("/v2/nothing")
    assert res.status_code == 404 and error_of(res)["code"] == "not_found"


def test_openai_client_raises_its_own_error_types(client) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input=[])
    assert exc.value.status_code == 400 and exc.value.param == "input"


def test_too_long_input_refused_when_truncation_is_off(minilm_artifact, reference) -> None:
    strict = Encoder(minilm_artifact, truncate=False, check_hashes=False)
    with BackgroundServer(create_app(strict, model_names=MODEL)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as exc:
            c.embeddings.create(model=MODEL, input=["fine", "word " * 1000])
        assert exc.value.code == "context_length_exceeded" and "input[1]" in exc.value.message
        r = c.embeddings.create(model=MODEL, input=["fine"])
        assert same_bits(np.array(r.data[0].embedding, dtype=np.float32), reference(["fine"])[0]).all()


def test_models_health_ready_metrics(client, http, serve_encoder) -> None:
    assert [m.id for m in client.models.list()] == [MODEL, "alias"]
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["dim"] == 384
    before = _metrics(http.base_url)
    client.embeddings.create(model=MODEL, input=["metrics please", "and another"])
    assert http.post("/v1/embeddings", json={"model": MODEL, "input": []}).status_code == 400
    res = http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    text = res.text
    for name in ("stableembed_queue_depth", "stableembed_queue_tokens", "stableembed_inflight_requests",
                 "stableembed_batch_texts_bucket", "stableembed_batch_tokens_bucket",
                 "stableembed_batch_encode_seconds_bucket", "stableembed_queue_wait_seconds_bucket",
                 "stableembed_request_latency_seconds_bucket", 'stableembed_requests_total{status="200"}',
                 "stableembed_texts_total", "stableembed_tokens_total"):
        assert name in text, name
    after = _metrics(http.base_url)
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    assert after["stableembed_queue_depth"] == 0
    assert delta("stableembed_texts_total") == 2 and delta('stableembed_requests_total{status="200"}') == 1
    assert delta('stableembed_rejected_total{reason="invalid"}') == 1
    assert delta('stableembed_requests_total{status="400"}') == 1
    tokens = sum(len(e.ids) for e in serve_encoder.tokenizer.encode(["metrics please", "and another"]))
    assert delta("stableembed_tokens_total") == tokens


def test_response_floats_round_trip_exactly() -> None:
    from stableembed.serve.protocol import response_body

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 384)).astype(np.float32)
    emb[0, :4] = [np.float32(1e-45), np.float32(-0.0), np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    body = json.loads(response_body(emb, model="m", encoding_format="float", prompt_tokens=3))
    assert same_bits(np.array([d["embedding"] for d in body["data"]], dtype=np.float32), emb).all()


def test_api_key(serve_encoder) -> None:
    app = create_app(serve_encoder, ServeConfig(api_key="s3cret"), model_names=MODEL)
    with BackgroundServer(app) as srv:
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.embeddings.create(model=MODEL, input="x").data) == 1
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.embeddings.create(model=MODEL, input="x")
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(srv.url + "/health").status_code == 200  # probes stay open


def test_cache_metrics_count_hits_and_misses(minilm_artifact, reference) -> None:
    """A server over an Encoder with an exact cache: a repeated text is answered from it with the same
    bits, and /metrics counts its hits, misses and entries."""
    enc = Encoder(minilm_artifact, check_hashes=False, cache_size=8)
    texts = ["cached once", "cached twice", "and a third"]
    with BackgroundServer(create_app(enc, model_names=MODEL)) as srv:
        payload = {"model": MODEL, "input": texts[:2], "encoding_format": "float"}
        first = httpx.post(srv.url + "/v1/embeddings", json=payload, timeout=60).json()
        payload["input"] = texts
        second = httpx.post(srv.url + "/v1/embeddings", json=payload, timeout=60).json()
        got = _metrics(srv.url)
    rows = np.array([d["embedding"] for d in second["data"]], dtype=np.float32)
    assert same_bits(rows, reference(texts)).all()
    assert [d["embedding"] for d in first["data"]] == [d["embedding"] for d in second["data"][:2]]
    assert (got["stableembed_cache_hits_total"], got["stableembed_cache_misses_total"],
            got["stableembed_cache_entries"]) == (2.0, 3.0, 3.0)
    # a second app on the same Metrics and Encoder (as after a reload) exports the cache once
    metrics = Metrics()
    for _ in range(2):
        create_app(enc, model_names=MODEL, metrics=metrics)
    samples = [line for line in metrics.render()[0].decode().splitlines() if line.startswith("stableembed_cache_")]
    assert len(samples) == 3, samples  # hits, misses, entries: once each


@pytest.mark.parametrize("settings, unit", [({"truncate_dim": 128}, False),
                                            ({"truncate_dim": 128, "normalize_embeddings": True}, True),
                                            ({"truncate_dim": 384}, True)])
def test_dimensions_renormalize_only_what_the_encoder_returns_unit_length(minilm_artifact, real_texts,
                                                                         settings, unit) -> None:
    """An Encoder that cuts its rows (truncate_dim) without normalizing returns rows that are not unit
    length: `dimensions` then cuts them plainly, as it does for a model without normalization; with
    normalize_embeddings, or a cut to the full width, it normalizes the prefix again."""
    from stableembed import Encoder
    from stableembed.runtime.encoder import finish_rows

    enc = Encoder(minilm_artifact, check_hashes=False, **settings)
    texts = _texts(real_texts)[:6]
    served = enc.encode(texts)
    with BackgroundServer(create_app(enc, model_names=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        for dims in (None, 64, enc.dim - 1, enc.dim):
            extra = {} if dims is None else {"dimensions": dims}
            r = client.embeddings.create(model=MODEL, input=texts, **extra)
            got = np.array([d.embedding for d in r.data], dtype=np.float32)
            want = served if dims is None else finish_rows(served, dims, unit and dims != enc.dim)
            assert same_bits(got, want).all(), dims
            norms = np.linalg.norm(got, axis=1)
            assert np.allclose(norms, 1, atol=1e-6) == unit, (dims, norms[:2])

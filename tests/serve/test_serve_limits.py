"""Backpressure, dynamic batching and graceful shutdown, made deterministic with a gated encoder: a bounded
queue answers 429, the concurrency limit 503; queued requests share one batch; a shutdown finishes the
requests in flight (bit-identical results) and refuses new ones."""

from __future__ import annotations

import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_helpers import GatedEncoder, error_of, wait_until  # noqa: E402

from stableembed.runtime.verify import same_bits  # noqa: E402
from stableembed.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402

MODEL = "m"


def _post(url: str, texts: list[str]) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"},
                      timeout=120)


def _vectors(res: httpx.Response) -> np.ndarray:
    import base64

    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in res.json()["data"]])


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise KeyError(name)


def test_queue_full_429_then_queued_requests_share_one_batch(serve_encoder, reference) -> None:
    gated = GatedEncoder(serve_encoder)
    config = ServeConfig(max_queue_texts=3, max_inputs=3, max_wait_ms=0)
    app = create_app(gated, config, model_names=MODEL)
    batcher = app.state.batcher
    a, b, c = ["first request"], ["second request", "two texts"], ["third request"]
    with BackgroundServer(app) as srv, ThreadPoolExecutor(4) as pool:
        fa = pool.submit(_post, srv.url, a)
        assert gated.entered.acquire(timeout=30)           # A is being encoded (held at the gate)
        fb = pool.submit(_post, srv.url, b)
        wait_until(lambda: batcher.queued_texts == 2, what="B queued")
        fc = pool.submit(_post, srv.url, c)
        wait_until(lambda: batcher.queued_texts == 3, what="C queued")
        res = _post(srv.url, ["one too many"])             # 3 texts waiting: the queue is full
        assert res.status_code == 429 and res.headers["retry-after"] == "1"
        err = error_of(res)
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert _metric(srv.url, "stableembed_queue_texts") == 3
        assert _metric(srv.url, "stableembed_inflight_requests") == 3
        gated.gate.set()
        results = [f.result(60) for f in (fa, fb, fc)]
        assert [r.status_code for r in results] == [200, 200, 200]
        for texts, r in zip((a, b, c), results):
            assert same_bits(_vectors(r), reference(texts)).all()
        # B and C waited together and ran as one batch of two requests
        assert gated.calls == [a, b + c]
        assert _metric(srv.url, 'stableembed_rejected_total{reason="queue_full"}') == 1
        assert _metric(srv.url, "stableembed_batch_requests_sum") == 3
        assert _metric(srv.url, "stableembed_batch_requests_count") == 2
        res = _post(srv.url, ["room again"])
        assert res.status_code == 200


def test_concurrency_limit_503(serve_encoder) -> None:
    gated = GatedEncoder(serve_encoder)
    app = create_app(gated, ServeConfig(max_concurrent_requests=1), model_names=MODEL)
    with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as pool:
        fa = pool.submit(_post, srv.url, ["held"])
        assert gated.entered.acquire(timeout=30)
        res = _post(srv.url, ["refused"])
        assert res.status_code == 503 and error_of(res)["code"] == "overloaded"
        assert res.headers["retry-after"] == "1"
        gated.gate.set()
        assert fa.result(60).status_code == 200


def test_budgets_split_batches(serve_encoder, reference) -> None:
    """A request larger than the text budget runs as several batches; the response is still whole."""
    gated = GatedEncoder(serve_encoder)
    gated.gate.set()
    app = create_app(gated, ServeConfig(max_dispatch_texts=4, max_dispatch_tokens=10_000), model_names=MODEL)
    texts = [f"text number {i}" for i in range(10)]
    with BackgroundServer(app) as srv:
        res = _post(srv.url, texts)
        assert res.status_code == 200
        assert same_bits(_vectors(res), reference(texts)).all()
    assert [len(c) for c in gated.calls] == [4, 4, 2]


def _connect_refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return False
    except OSError:
        return True


def test_graceful_shutdown_finishes_in_flight_requests(serve_encoder, reference) -> None:
    gated = GatedEncoder(serve_encoder)
    app = create_app(gated, ServeConfig(max_wait_ms=0), model_names=MODEL)
    srv = BackgroundServer(app, graceful_timeout=60).start()
    a, b = ["in flight when the signal came"], ["queued when the signal came", "and a second text"]
    with httpx.Client(base_url=srv.url, timeout=30) as keepalive, ThreadPoolExecutor(2) as pool:
        assert keepalive.get("/ready").status_code == 200
        fa = pool.submit(_post, srv.url, a)
        assert gated.entered.acquire(timeout=30)
        fb = pool.submit(_post, srv.url, b)
        wait_until(lambda: app.state.batcher.queued_texts == 2, what="B queued")
        srv.server.handle_exit(signal.SIGTERM, None)          # what uvicorn does on SIGTERM
        assert app.state.serving["draining"]
        wait_until(lambda: _connect_refused(srv.url), what="the listening socket to close")
        assert srv.thread.is_alive() and not fa.done() and not fb.done()
        gated.gate.set()
        ra, rb = fa.result(60), fb.result(60)
    assert ra.status_code == rb.status_code == 200
    assert same_bits(_vectors(ra), reference(a)).all() and same_bits(_vectors(rb), reference(b)).all()
    srv.thread.join(60)
    assert not srv.thread.is_alive()
    assert not app.state.batcher.accepting


def test_batcher_after_close_refuses(serve_encoder) -> None:
    import asyncio

    from stableembed.serve.batcher import Batcher, Closed

    async def main() -> None:
        batcher = Batcher(serve_encoder, max_wait=0)
        batcher.start()
        out = await batcher.submit(["hello"], [3])
        assert out.shape == (1, 384)
        await batcher.close()
        with pytest.raises(Closed):
            await batcher.submit(["hello"], [3])

    asyncio.run(main())


def test_segments() -> None:
    from stableembed.serve.batcher import _segments

    assert _segments([5, 5, 5, 5], 10, 100) == [(0, 2, 10), (2, 4, 10)]
    assert _segments([50, 1, 1], 10, 100) == [(0, 1, 50), (1, 3, 2)]   # one text over budget: alone
    assert _segments([1] * 5, 100, 2) == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    assert _segments([], 10, 10) == []


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_queue_texts"):
        ServeConfig(max_inputs=10, max_queue_texts=5)
    with pytest.raises(ValueError, match="max_wait_ms"):
        ServeConfig(max_wait_ms=-1)

"""Backpressure, dynamic batching and graceful shutdown, made deterministic with a gated encoder: a bounded
queue (texts and tokens) answers 429, the concurrency limit 503; queued requests of different lengths
share one padded batch; a free worker waits up to max_wait for companions; a client that disconnects takes
its texts out of the queue; draining answers 503; a shutdown finishes the requests in flight
(bit-identical results) and refuses new ones."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import GatedEncoder, error_of, wait_until
from starlette.testclient import TestClient

from stableembed.runtime.verify import same_bits
from stableembed.serve import BackgroundServer, ServeConfig, create_app
from stableembed.serve.batcher import Batcher

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


def test_queue_full_429_then_queued_requests_share_one_batch(serve_encoder, reference, monkeypatch) -> None:
    gated = GatedEncoder(serve_encoder)
    config = ServeConfig(max_queue_texts=3, max_inputs=3, max_wait_ms=0)
    app = create_app(gated, config, model_names=MODEL)
    batcher = app.state.batcher
    # B and C differ in token length, so sharing one batch pads C's text to B's longest
    a = ["first request"]
    b = ["a second request whose first text is a good deal longer than the others", "two"]
    c = ["the third one"]
    lengths = {t: len(e.ids) for t, e in zip(b + c, serve_encoder.tokenizer.encode(b + c))}
    assert len(set(lengths.values())) == 3
    runs: list[list[int]] = []
    inner_run = serve_encoder.backend.run
    monkeypatch.setattr(serve_encoder.backend, "run", lambda feeds: (
        runs.append(sorted(feeds["attention_mask"].sum(axis=1).tolist())), inner_run(feeds))[1])
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
        # B and C waited together and ran as one batch of two requests, padded together at the backend
        assert gated.calls == [a, b + c]
        assert sorted(lengths.values()) in runs, runs
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
    for name in ("max_inputs", "max_body_bytes", "max_concurrent_requests"):  # 0: every request refused
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            ServeConfig(**{name: 0})


def test_a_request_refused_while_arriving_stops_the_wait_for_it(serve_encoder) -> None:
    """A queued request waits for companions only while others are being read: when the one being read
    is refused (here: bad JSON), the queued one runs at once, not after max_wait (60 s here)."""
    app = create_app(serve_encoder, ServeConfig(max_wait_ms=60_000), model_names=[MODEL])
    with BackgroundServer(app) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"model": "m", "input": ["b" BROKEN'
        slow = socket.create_connection((host, int(port)), timeout=30)
        slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
                     + body[:10])
        wait_until(lambda: app.state.serving["arriving"] == 1)  # its body is being read
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_post, srv.url, ["a"])
            wait_until(lambda: app.state.batcher.queued_texts == 1)  # queued, its worker waits
            time.sleep(0.2)
            slow.sendall(body[10:])
            assert slow.recv(1000).startswith(b"HTTP/1.1 400")
            refused = time.monotonic()
            assert queued.result(60).status_code == 200
            assert time.monotonic() - refused < 10
        slow.close()


def test_a_stalled_body_is_answered_408_and_frees_its_slot(serve_encoder) -> None:
    """A client that sends its headers and part of its body, then stalls: after body_timeout_s it is
    answered 408 request_timeout, no longer counted as arriving or in flight, and its concurrency slot
    (the only one here) serves the next request."""
    app = create_app(serve_encoder, ServeConfig(body_timeout_s=0.5, max_concurrent_requests=1), model_names=[MODEL])
    with BackgroundServer(app) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = json.dumps({"model": MODEL, "input": ["never finished"]}).encode()
        stalled = socket.create_connection((host, int(port)), timeout=30)
        stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
                        + body[:10])
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        wait_until(lambda: app.state.serving["inflight"] == 0 and app.state.serving["arriving"] == 0)
        assert _post(srv.url, ["the next request"]).status_code == 200
        assert _metric(srv.url, 'stableembed_rejected_total{reason="body_timeout"}') == 1
        stalled.close()


def _raw_request(url: str, payload: dict) -> socket.socket:
    """POST on a raw socket, the whole body sent, the answer not read: close it to disconnect."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_disconnected_client_texts_are_not_embedded(serve_encoder, reference) -> None:
    gated = GatedEncoder(serve_encoder)
    app = create_app(gated, ServeConfig(max_wait_ms=0), model_names=MODEL)
    batcher = app.state.batcher
    a, b, c = ["held at the gate"], ["queued, then its client leaves", "a second text of the leaver"], ["later"]
    with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as pool:
        fa = pool.submit(_post, srv.url, a)
        assert gated.entered.acquire(timeout=30)  # A is being encoded
        sock = _raw_request(srv.url, {"model": MODEL, "input": b})
        wait_until(lambda: batcher.queued_texts == 2, what="B queued")
        sock.close()  # B's client disconnects while B waits in the queue
        wait_until(lambda: batcher.queued_texts == 0 and batcher.queued_tokens == 0, what="B dropped")
        assert _metric(srv.url, 'stableembed_rejected_total{reason="disconnected"}') == 1
        gated.gate.set()
        ra = fa.result(60)
        rc = _post(srv.url, c)
        assert ra.status_code == rc.status_code == 200
        assert same_bits(_vectors(rc), reference(c)).all()
        assert gated.calls == [a, c]  # B's texts never reached the encoder
        assert _metric(srv.url, 'stableembed_requests_total{status="499"}') == 1
        assert _metric(srv.url, "stableembed_texts_total") == 2


def test_not_ready_and_draining_answer_503_unavailable(serve_encoder) -> None:
    app = create_app(serve_encoder, model_names=MODEL)
    payload = {"model": MODEL, "input": ["x"]}

    def refused(client) -> None:
        res = client.get("/ready")
        assert res.status_code == 503 and res.json()["status"] == "unavailable"
        res = client.post("/v1/embeddings", json=payload)
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        err = error_of(res)
        assert err["code"] == "unavailable" and err["type"] == "server_error"

    refused(TestClient(app))  # no lifespan: the batcher has not started
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/ready").status_code == 200
        assert http.post("/v1/embeddings", json=payload).status_code == 200
        app.state.serving["draining"] = True  # what the runner's signal handler sets first (graceful test below)
        refused(http)
        app.state.serving["draining"] = False
        assert http.get("/ready").status_code == 200
        assert http.post("/v1/embeddings", json=payload).status_code == 200


def test_queue_token_bound_429_and_request_over_it_400(serve_encoder) -> None:
    gated = GatedEncoder(serve_encoder)
    app = create_app(gated, ServeConfig(max_queue_tokens=30, max_wait_ms=0), model_names=MODEL)
    count = lambda texts: sum(len(e.ids) for e in serve_encoder.tokenizer.encode(texts))  # noqa: E731
    b = ["a request of twenty tokens or so, waiting in the queue for its turn"]
    c = ["and another one of the same kind that no longer fits in the queue"]
    assert count(b) <= 30 < count(b) + count(c)
    with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as pool:
        res = _post(srv.url, ["word " * 60])  # over the bound by itself: never queueable
        assert res.status_code == 400 and error_of(res)["code"] == "request_too_large"
        assert "queues at most 30" in error_of(res)["message"]
        fa = pool.submit(_post, srv.url, ["held"])
        assert gated.entered.acquire(timeout=30)
        fb = pool.submit(_post, srv.url, b)
        wait_until(lambda: app.state.batcher.queued_tokens == count(b), what="B queued")
        res = _post(srv.url, c)
        assert res.status_code == 429 and error_of(res)["code"] == "queue_full"
        gated.gate.set()
        assert fa.result(60).status_code == fb.result(60).status_code == 200
        assert _post(srv.url, c).status_code == 200


@pytest.mark.parametrize("max_wait", [0.0, 60.0])
def test_max_wait_holds_a_free_worker_for_companions(serve_encoder, max_wait) -> None:
    """While requests are on their way (`arriving`), a free worker waits up to max_wait for companions:
    with 0 a lone request runs at once, with 60 s the next request joins it in one batch."""
    gated = GatedEncoder(serve_encoder)
    gated.gate.set()

    async def main() -> None:
        batcher = Batcher(gated, max_wait=max_wait, max_dispatch_texts=2, arriving=lambda: 1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["first"], [3]))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(batcher.submit(["second"], [3]))
        await asyncio.wait_for(asyncio.gather(first, second), 60)
        await batcher.close()

    asyncio.run(main())
    assert gated.calls == ([["first"], ["second"]] if max_wait == 0 else [["first", "second"]])


def test_max_wait_is_waited_when_no_companion_comes(serve_encoder) -> None:
    gated = GatedEncoder(serve_encoder)
    gated.gate.set()
    entered: list[float] = []
    inner = gated.encode
    gated.encode = lambda texts, **kw: (entered.append(time.monotonic()), inner(texts, **kw))[1]

    async def main() -> float:
        batcher = Batcher(gated, max_wait=0.3, arriving=lambda: 1)
        batcher.start()
        t0 = time.monotonic()
        await asyncio.wait_for(batcher.submit(["alone"], [3]), 60)
        await batcher.close()
        return t0

    t0 = asyncio.run(main())
    assert entered and entered[0] - t0 >= 0.3

"""`stableembed serve` as a real process: it starts, answers the official client, and SIGTERM or SIGINT
stops it cleanly with an exit status naming the signal; its flags reach the server's behaviour."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import error_of

from stableembed.cli import build_parser
from stableembed.runtime.verify import same_bits
from stableembed.serve import BackgroundServer, create_app
from stableembed.serve.server import free_port, serve_config


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_end_to_end(minilm_artifact, reference, sig) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stableembed", "serve", str(minilm_artifact), "--port", str(port),
                             "--model-name", "minilm", "--max-wait-ms", "1", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # A shell starts background jobs with SIGINT ignored, and an ignored signal stays
                            # ignored in the child (uvicorn's re-raise then does nothing): give it the default.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        texts = ["served by a subprocess", "second"]
        r = client.embeddings.create(model="minilm", input=texts)
        assert same_bits(np.array([d.embedding for d in r.data], dtype=np.float32), reference(texts)).all()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn re-raises the signal once shut down, so the exit status names it
    assert proc.returncode == -sig, out
    assert "Application shutdown complete" in out and "Traceback" not in out, out


def _config(*flags: str):
    return serve_config(build_parser().parse_args(["serve", "ARTIFACT", *flags]))


def test_serve_flags_reach_the_server(serve_encoder) -> None:
    """--no-dimensions refuses `dimensions`; --max-queue-tokens bounds a request's tokens; --max-wait-ms and
    the other knobs reach the batcher (their behaviour: test_serve_limits.py)."""
    payload = {"model": "m", "input": ["some words to embed"], "dimensions": 8}
    for flags, status in (((), 200), (("--no-dimensions",), 400)):
        with BackgroundServer(create_app(serve_encoder, _config(*flags), model_names="m")) as srv:
            res = httpx.post(srv.url + "/v1/embeddings", json=payload, timeout=60)
            assert res.status_code == status, (flags, res.text)
            if status == 400:
                assert error_of(res)["param"] == "dimensions"
    app = create_app(serve_encoder, _config("--max-queue-tokens", "5", "--max-wait-ms", "250",
                                            "--max-dispatch-texts", "7"), model_names="m")
    assert (app.state.batcher.max_queue_tokens, app.state.batcher.max_wait, app.state.batcher.max_dispatch_texts) == \
        (5, 0.25, 7)
    with BackgroundServer(app) as srv:
        res = httpx.post(srv.url + "/v1/embeddings", json={"model": "m", "input": ["six tokens in this one"]},
                         timeout=60)
        assert res.status_code == 400 and "queues at most 5" in error_of(res)["message"]


def test_warm_up_is_on_by_default_and_can_be_turned_off(monkeypatch, minilm_artifact) -> None:
    """`stableembed serve` warms the encoder up (Encoder.warm_up, tested in tests/runtime) before it starts
    the server, with the server's batch size, unless --no-warm-up."""
    from stableembed.runtime import Encoder
    from stableembed.serve import server as server_mod

    calls = []
    monkeypatch.setattr(Encoder, "warm_up", lambda self, batch_size=32: calls.append(batch_size))

    class _Stop(Exception):
        pass

    def no_server(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(server_mod, "make_server", no_server)
    for flags, expected in (([], [32]), (["--batch-size", "8"], [8]), (["--no-warm-up"], [])):
        calls.clear()
        args = build_parser().parse_args(["serve", str(minilm_artifact), *flags])
        with pytest.raises(_Stop):
            args.func(args)
        assert calls == expected, flags


def test_cache_size_reaches_the_encoder(monkeypatch, minilm_artifact) -> None:
    """--cache-size gives the served Encoder an exact cache of that many embeddings (none by default)."""
    from stableembed.serve import server as server_mod

    served = []

    class _Stop(Exception):
        pass

    def no_server(app, *args, **kwargs):
        served.append(app.state.batcher.encoder)
        raise _Stop

    monkeypatch.setattr(server_mod, "make_server", no_server)
    for flags, capacity in (([], None), (["--cache-size", "100"], 100)):
        args = build_parser().parse_args(["serve", str(minilm_artifact), "--no-warm-up", *flags])
        with pytest.raises(_Stop):
            args.func(args)
        cache = served[-1].cache
        assert (cache.info().capacity if cache is not None else None) == capacity, flags


@pytest.mark.parametrize("missing", ["starlette", "prometheus_client", "uvicorn"])
def test_a_half_installed_serve_extra_names_the_extra(minilm_artifact, missing, monkeypatch, capsys) -> None:
    from stableembed.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # import fails, as if not installed
    assert main(["serve", str(minilm_artifact), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} is needed here but not installed" in err and "stableembed[serve]" in err

"""`stableembed serve` as a real process: it starts, answers the official client, and a SIGTERM stops it
cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from stableembed.runtime.verify import same_bits  # noqa: E402
from stableembed.serve.server import free_port  # noqa: E402


@pytest.mark.slow
def test_serve_command_end_to_end(minilm_artifact, reference) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stableembed", "serve", str(minilm_artifact), "--port", str(port),
                             "--model-name", "minilm", "--max-wait-ms", "1", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn re-raises the signal once shut down, so the exit status names SIGTERM (or 0 on platforms
    # where it does not)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out

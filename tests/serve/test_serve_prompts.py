"""Prompts over HTTP: the `prompt_name` request field (as text-embeddings-inference names it, sent by the
`openai` client through `extra_body`), the server's `--default-prompt-name`, the model's own default, an
unknown name as an OpenAI-shaped 400, and requests with different prompts batched together, each
bit-identical to `Encoder.encode` offline. Tiny random-weight models with prompts (prompt_models.py)."""

from __future__ import annotations

import base64
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import GatedEncoder, error_of, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from prompt_models import PROMPTS, prompted_model  # noqa: E402

from stableembed import Encoder  # noqa: E402
from stableembed.cli import main  # noqa: E402
from stableembed.runtime.verify import same_bits  # noqa: E402
from stableembed.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.slow  # exports tiny models
MODEL = "tiny"
TEXTS = ["a query about embeddings", "ünïcödé 🚀", "The quick brown fox jumps over the lazy dog."]


def _vectors(data) -> np.ndarray:
    return np.array([d.embedding for d in data], dtype=np.float32)


@pytest.fixture(scope="module")
def default_encoder() -> Encoder:
    return Encoder(prompted_model("default")[1], check_hashes=False)


@pytest.fixture(scope="module")
def server(default_encoder):
    with BackgroundServer(create_app(default_encoder, ServeConfig(max_wait_ms=1), model_names=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_prompt_name_through_the_openai_client(client, default_encoder) -> None:
    for name in ("document", "instruct", "empty", "query"):
        r = client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"prompt_name": name})
        assert same_bits(_vectors(r.data), default_encoder.encode(TEXTS, prompt_name=name)).all(), name
        # usage counts the tokens the model saw: the prompt's included
        tokens = sum(len(e.ids) for e in default_encoder.tokenizer.encode(TEXTS, prompt=PROMPTS[name]))
        assert r.usage.prompt_tokens == tokens
    # no prompt_name: the model's default prompt ("query"), as Encoder.encode and sentence-transformers
    r = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert same_bits(_vectors(r.data), default_encoder.encode(TEXTS, prompt_name="query")).all()
    assert not same_bits(_vectors(r.data), default_encoder.encode(TEXTS, prompt="")).any()


def test_unknown_or_bad_prompt_name_is_an_openai_shaped_400(client, server) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"prompt_name": "nope"})
    assert exc.value.status_code == 400 and exc.value.param == "prompt_name"
    assert exc.value.code == "prompt_not_found"
    assert "'nope'" in exc.value.message and "'query', 'document', 'instruct', 'empty'" in exc.value.message
    res = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "x", "prompt_name": 7})
    assert res.status_code == 400
    err = error_of(res)
    assert err["param"] == "prompt_name" and "must be a string" in err["message"]
    assert client.embeddings.create(model=MODEL, input="still fine").data  # the server keeps serving


def test_server_default_prompt_name(default_encoder) -> None:
    app = create_app(default_encoder, ServeConfig(default_prompt_name="instruct"), model_names=MODEL)
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.embeddings.create(model=MODEL, input=TEXTS)
        assert same_bits(_vectors(r.data), default_encoder.encode(TEXTS, prompt_name="instruct")).all()
        r = c.embeddings.create(model=MODEL, input=TEXTS, extra_body={"prompt_name": "document"})
        assert same_bits(_vectors(r.data), default_encoder.encode(TEXTS, prompt_name="document")).all()
    with pytest.raises(ValueError, match="default prompt name 'nope' is not one of the model's prompts"):
        create_app(default_encoder, ServeConfig(default_prompt_name="nope"))


def test_requests_with_different_prompts_share_a_batch_bit_identically() -> None:
    """include_prompt=false model: three requests queued while the worker is held, then dispatched as one
    batch; the batcher makes one encode call per prompt, and every response equals offline."""
    enc = Encoder(prompted_model("excluded")[1], check_hashes=False)
    gated = GatedEncoder(enc)
    app = create_app(gated, ServeConfig(max_wait_ms=0), model_names=MODEL)
    batcher = app.state.batcher
    first, reqs = ["held at the gate"], [(TEXTS[:2], "instruct"), (TEXTS[1:], None), (TEXTS, "instruct")]

    def post(url, texts, name):
        body = {"model": MODEL, "input": texts, **({"prompt_name": name} if name else {})}
        return httpx.post(url + "/v1/embeddings", json=body, timeout=120)

    with BackgroundServer(app) as srv, ThreadPoolExecutor(4) as pool:
        f0 = pool.submit(post, srv.url, first, "query")
        assert gated.entered.acquire(timeout=30)
        futures = []
        for texts, name in reqs:
            futures.append(pool.submit(post, srv.url, texts, name))
            wait_until(lambda n=len(futures): batcher.queued_texts == sum(len(t) for t, _ in reqs[:n]),
                       what="request queued")
        gated.gate.set()
        assert f0.result(60).status_code == 200
        for (texts, name), fut in zip(reqs, futures):
            res = fut.result(60)
            assert res.status_code == 200, res.text
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                            if isinstance(d["embedding"], str) else np.array(d["embedding"], np.float32)
                            for d in res.json()["data"]])
            assert same_bits(got, enc.encode(texts, prompt_name=name)).all(), name
    # one batch after the held one, split by prompt: the instruct texts of both requests together
    assert gated.calls[1:] == [TEXTS[:2] + TEXTS, TEXTS[1:]]
    assert gated.prompts == [PROMPTS["query"], PROMPTS["instruct"], None]


def test_serve_command_default_prompt_name_option(monkeypatch) -> None:
    import stableembed.serve.server as server_mod

    seen = {}

    class NoServer:
        def run(self):
            return None

    def fake_make_server(app, *args, **kwargs):
        seen["app"] = app
        return NoServer()

    monkeypatch.setattr(server_mod, "make_server", fake_make_server)
    art = str(prompted_model("default")[1])
    assert main(["serve", art, "--default-prompt-name", "document"]) == 0
    assert seen["app"].state.config.default_prompt_name == "document"
    assert main(["serve", art, "--default-prompt-name", "nope"]) == 2

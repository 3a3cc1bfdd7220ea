"""The ASGI app (Starlette): OpenAI-compatible embeddings over a shared dynamic batcher.

Routes:
    POST /v1/embeddings   the OpenAI embeddings API (see protocol.py)
    GET  /v1/models       the served model names, OpenAI-shaped
    GET  /health          liveness: 200 while the process serves HTTP
    GET  /ready           readiness: 200 when accepting work, 503 before start-up and while draining
    GET  /metrics         Prometheus text format

With `api_key` set, /v1/* answers 401 without "Authorization: Bearer <api_key>" (the other routes stay
open, for probes and scrapers).

Limits, each answered OpenAI-shaped: a body over `max_body_bytes` -> 413; more than `max_inputs` texts,
an empty or non-string input, a text over max_length tokens when the Encoder does not truncate -> 400;
more than `max_concurrent_requests` requests at once -> 503; the bounded batch queue full -> 429; during
shutdown -> 503. Memory is thus bounded by max_concurrent_requests x max_body_bytes (plus the queue's
outputs, max_queue_texts x dim x 4 bytes), whatever the load.

A client that disconnects while its texts wait in the queue takes them out of it: they are not embedded
(texts already in a running batch finish with it, and their result is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import Batcher, Closed, QueueFull
from .config import ServeConfig
from .metrics import Metrics
from ..runtime.tokenize import model_prompts, resolve_prompt
from .protocol import APIError, error_body, invalid, parse_request, response_body, truncate_dimensions

JSON_TYPE = "application/json"
# Work this large moves off the event loop to a thread, so one big request does not stall the others.
INLINE_CHARS = 16_384
INLINE_BODY = 256 * 1024
INLINE_ROWS = 64
# Recorded (metrics, never sent) for a request whose client left before its answer: nginx's code.
CLIENT_CLOSED = 499


class _ClientGone(Exception):
    """The client closed the connection before its response was ready."""


def _error_response(err: APIError) -> Response:
    return Response(error_body(err), status_code=err.status, media_type=JSON_TYPE, headers=err.headers)


async def _off_loop(big: bool, fn: Callable[..., Any], *args: Any) -> Any:
    if not big:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client closes the connection. Call only once the body is read: the server then
    answers `receive()` with nothing but the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.01)  # a server that repeats empty body messages: do not spin


class _Embeddings:
    """POST /v1/embeddings, step by step: admit (key, draining, concurrency limit), read the body, parse,
    tokenize, queue the texts in the batcher while watching for the client leaving, answer. `state` is
    shared with the runner: {"inflight", "arriving", "draining"}."""

    def __init__(self, encoder: Any, config: ServeConfig, names: tuple[str, ...], metrics: Metrics):
        self.encoder = encoder
        self.config = config
        self.names = names
        self.metrics = metrics
        # Whether the rows the encoder returns are unit length, so that `dimensions` normalizes its prefix
        # again: the model's own normalization, unless the Encoder cuts it (truncate_dim) without
        # normalizing, or the Encoder's normalize_embeddings.
        manifest = encoder.manifest
        cut = getattr(encoder, "truncate_dim", None) not in (None, getattr(manifest, "dim", None))
        self.normalize = (bool(getattr(encoder, "normalize_embeddings", False))
                          or (bool(getattr(manifest, "normalize", False)) and not cut))
        self.prompts = model_prompts(encoder.manifest)
        if config.default_prompt_name is not None and config.default_prompt_name not in self.prompts:
            raise ValueError(f"default prompt name {config.default_prompt_name!r} is not one of the model's "
                             f"prompts ({', '.join(map(repr, self.prompts)) or 'it defines none'})")
        self.state = {"inflight": 0, "arriving": 0, "draining": False}
        self.batcher = Batcher(encoder, max_dispatch_tokens=config.max_dispatch_tokens,
                               max_dispatch_texts=config.max_dispatch_texts, max_wait=config.max_wait_ms / 1000,
                               max_queue_texts=config.max_queue_texts, max_queue_tokens=config.max_queue_tokens,
                               batch_size=config.batch_size, workers=config.workers, metrics=metrics,
                               arriving=lambda: self.state["arriving"])
        self.retry = {"Retry-After": str(config.retry_after_s)}

    # -- admission ---------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        if self.config.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode())

    @property
    def accepting(self) -> bool:
        return self.batcher.accepting and not self.state["draining"]

    def refusal(self, request: Request) -> APIError | None:
        """Why this request is refused before its body is read, if it is."""
        if not self.authorized(request):
            return APIError(401, "Incorrect API key provided", param=None, code="invalid_api_key")
        if not self.accepting:
            self.metrics.rejected.labels("shutting_down").inc()
            return APIError(503, "the server is shutting down or not ready", type="server_error",
                            code="unavailable", headers=self.retry)
        if self.state["inflight"] >= self.config.max_concurrent_requests:
            self.metrics.rejected.labels("concurrency").inc()
            return APIError(503, f"the server is handling {self.state['inflight']} requests, its limit; "
                                 f"retry later", type="server_error", code="overloaded", headers=self.retry)
        return None

    # -- the route ---------------------------------------------------------------------------------

    async def route(self, request: Request) -> Response:
        refused = self.refusal(request)
        if refused is not None:
            self.metrics.requests.labels(str(refused.status)).inc()
            return _error_response(refused)
        state, m = self.state, self.metrics
        state["inflight"] += 1
        state["arriving"] += 1  # until submitted to the batcher (or refused): the batcher waits for it
        m.inflight.inc()
        t0 = time.perf_counter()
        status, arriving = 500, [True]
        try:
            response = await self.handle(request, arriving)
            status = response.status_code
            return response
        except APIError as err:
            status = err.status
            if err.status in (400, 404, 413):
                m.rejected.labels("invalid").inc()
            elif err.status == 408:
                m.rejected.labels("body_timeout").inc()
            return _error_response(err)
        except (_ClientGone, ClientDisconnect):
            status = CLIENT_CLOSED
            m.rejected.labels("disconnected").inc()
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        finally:
            if arriving[0]:  # it ended before submitting: the dispatcher stops waiting for it
                state["arriving"] -= 1
                self.batcher.arrival_ended()
            state["inflight"] -= 1
            m.inflight.dec()
            m.requests.labels(str(status)).inc()
            m.request_latency.observe(time.perf_counter() - t0)

    async def handle(self, request: Request, arriving: list[bool]) -> Response:
        body = await self.read_body(request)
        try:
            payload = await _off_loop(len(body) > INLINE_BODY, json.loads, body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid(f"the request body is not valid JSON: {exc}", param=None) from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise invalid("the request body's JSON is nested too deeply", param=None) from None
        req = parse_request(payload, model_names=self.names, dim=self.encoder.dim, max_inputs=self.config.max_inputs,
                            allow_dimensions=self.config.allow_dimensions, prompts=self.prompts)
        # the request's prompt, else the server's default, else the model's (as Encoder.encode chooses)
        prompt = resolve_prompt(self.encoder.manifest, req.prompt_name or self.config.default_prompt_name)
        tokens = await _off_loop(sum(map(len, req.texts)) > INLINE_CHARS, self.count_tokens, req.texts, prompt)
        total = sum(tokens)
        try:
            self.batcher.check_fits(len(tokens), total)
        except ValueError as exc:
            raise invalid(str(exc), code="request_too_large") from None
        self.state["arriving"] -= 1
        arriving[0] = False
        emb = await self.embed(request, req.texts, tokens, prompt)
        emb = truncate_dimensions(emb, req.dimensions, self.normalize)
        out = await _off_loop(len(tokens) > INLINE_ROWS, lambda: response_body(
            emb, model=req.model, encoding_format=req.encoding_format, prompt_tokens=total))
        self.metrics.texts.inc(len(tokens))
        self.metrics.tokens.inc(total)
        return Response(out, media_type=JSON_TYPE)

    # -- the steps ---------------------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                           param=None, code="request_too_large")
        # uvicorn sets no limit on reading a body: a client that sends its headers and stalls would hold a
        # concurrency slot, and count as arriving (every dispatch waiting max_wait for it), for ever.
        timeout = self.config.body_timeout_s or None
        try:
            return await asyncio.wait_for(self._read_body(request, limit), timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", param=None,
                           code="request_timeout") from None

    async def _read_body(self, request: Request, limit: int) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", param=None,
                               code="request_too_large")
        return bytes(body)

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        try:
            return [len(e.ids) for e in self.encoder.tokenizer.encode(texts, prompt=prompt)]
        except ValueError as exc:  # "text at index i is longer than max_length ... truncation is off", bad UTF-8
            msg = str(exc)
            code = "context_length_exceeded" if "longer than max_length" in msg else None
            raise invalid(re.sub(r"^text at index (\d+)", r"input[\1]", msg), code=code) from None

    async def embed(self, request: Request, texts: list[str], tokens: list[int], prompt: str | None) -> np.ndarray:
        """The texts' embeddings from the shared batcher; raises _ClientGone (and takes the texts out of
        the queue) if the client disconnects first."""
        submitted = asyncio.ensure_future(self.batcher.submit(texts, tokens, prompt=prompt))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait((submitted, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not submitted.done():
                submitted.cancel()  # the batcher takes the request's waiting segments out of the queue
                await asyncio.wait((submitted,))
        if submitted.cancelled():
            raise _ClientGone()
        try:
            return submitted.result()
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"{exc}; retry later", type="rate_limit_error", code="queue_full",
                           headers=self.retry) from None
        except Closed as exc:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError(503, str(exc), type="server_error", code="unavailable", headers=self.retry) from None


def create_app(encoder: Any, config: ServeConfig | None = None, model_names: str | list[str] | None = None,
               metrics: Metrics | None = None) -> Starlette:
    """An ASGI app serving `encoder` (a stableembed Encoder, or anything with its interface: `encode`,
    `dim`, `tokenizer.encode`, `manifest.normalize`). `model_names`: the names clients may ask for in
    `model` (a response names the one its request asked for); default: the artifact folder's name."""
    config = config or ServeConfig()
    if model_names is None:
        model_names = [Path(encoder.manifest.folder).name]
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    if not names:
        raise ValueError("model_names must name at least one model")
    metrics = metrics or Metrics()
    if getattr(encoder, "cache", None) is not None:
        metrics.watch_cache(encoder.cache)
    embeddings = _Embeddings(encoder, config, names, metrics)
    batcher, state = embeddings.batcher, embeddings.state

    async def models(request: Request) -> Response:
        if not embeddings.authorized(request):
            return _error_response(APIError(401, "Incorrect API key provided", param=None, code="invalid_api_key"))
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "stableembed"} for n in names]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        ok = embeddings.accepting
        body = {"status": "ready" if ok else "unavailable", "model": names[0], "dim": encoder.dim,
                "queue_texts": batcher.queued_texts, "queue_tokens": batcher.queued_tokens,
                "inflight_requests": state["inflight"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                            param=None, code=kind))
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            state["draining"] = True
            await batcher.close()  # encodes whatever is still queued

    app = Starlette(routes=[
        Route("/v1/embeddings", embeddings.route, methods=["POST"]),
        Route("/embeddings", embeddings.route, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.config = config
    app.state.model_names = names
    app.state.serving = state  # {"inflight": n, "arriving": n, "draining": bool}; the runner sets draining
    return app

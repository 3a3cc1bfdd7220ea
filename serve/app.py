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
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
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


def _error_response(err: APIError) -> Response:
    return Response(error_body(err), status_code=err.status, media_type=JSON_TYPE, headers=err.headers)


def create_app(encoder: Any, config: ServeConfig | None = None, model_names: str | list[str] | None = None,
               metrics: Metrics | None = None) -> Starlette:
    """An ASGI app serving `encoder` (a stableembed Encoder, or anything with its interface: `encode`,
    `dim`, `tokenizer.encode`, `manifest.normalize`). `model_names`: the names clients may ask for in
    `model` (the first is echoed back); default: the artifact folder's name."""
    config = config or ServeConfig()
    if model_names is None:
        model_names = [Path(encoder.manifest.folder).name]
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    if not names:
        raise ValueError("model_names must name at least one model")
    metrics = metrics or Metrics()
    normalize = bool(getattr(encoder.manifest, "normalize", False))
    prompts = model_prompts(encoder.manifest)
    if config.default_prompt_name is not None and config.default_prompt_name not in prompts:
        raise ValueError(f"default prompt name {config.default_prompt_name!r} is not one of the model's prompts "
                         f"({', '.join(map(repr, prompts)) or 'it defines none'})")
    batcher = Batcher(encoder, max_dispatch_tokens=config.max_dispatch_tokens,
                      max_dispatch_texts=config.max_dispatch_texts, max_wait=config.max_wait_ms / 1000,
                      max_queue_texts=config.max_queue_texts, max_queue_tokens=config.max_queue_tokens,
                      batch_size=config.batch_size, workers=config.workers, metrics=metrics,
                      arriving=lambda: state["arriving"])
    state = {"inflight": 0, "arriving": 0, "draining": False}
    retry = {"Retry-After": str(config.retry_after_s)}

    def tokenize(texts: list[str], prompt: str | None) -> list[int]:
        try:
            return [len(e.ids) for e in encoder.tokenizer.encode(texts, prompt=prompt)]
        except ValueError as exc:  # "text at index i is longer than max_length ... truncation is off", bad UTF-8
            msg = str(exc)
            code = "context_length_exceeded" if "longer than max_length" in msg else None
            msg = re.sub(r"^text at index (\d+)", r"input[\1]", msg)
            raise invalid(msg, code=code) from None

    async def off_loop(big: bool, fn: Any, *args: Any) -> Any:
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                           param=None, code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", param=None,
                               code="request_too_large")
        return bytes(body)

    def authorized(request: Request) -> bool:
        if config.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode())

    unauthorized = APIError(401, "Incorrect API key provided", param=None, code="invalid_api_key")

    async def embeddings(request: Request) -> Response:
        if not authorized(request):
            metrics.requests.labels("401").inc()
            return _error_response(unauthorized)
        if state["draining"] or not batcher.accepting:
            metrics.rejected.labels("shutting_down").inc()
            metrics.requests.labels("503").inc()
            return _error_response(APIError(503, "the server is shutting down or not ready", type="server_error",
                                            code="unavailable", headers=retry))
        if state["inflight"] >= config.max_concurrent_requests:
            metrics.rejected.labels("concurrency").inc()
            metrics.requests.labels("503").inc()
            return _error_response(APIError(503, f"the server is handling {state['inflight']} requests, its "
                                                 f"limit; retry later", type="server_error", code="overloaded",
                                            headers=retry))
        state["inflight"] += 1
        state["arriving"] += 1  # until submitted to the batcher (or refused)
        metrics.inflight.inc()
        t0 = time.perf_counter()
        status = 500
        arriving = True
        try:
            body = await read_body(request)
            try:
                payload = await off_loop(len(body) > INLINE_BODY, json.loads, body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise invalid(f"the request body is not valid JSON: {exc}", param=None) from None
            req = parse_request(payload, model_names=names, dim=encoder.dim, max_inputs=config.max_inputs,
                                allow_dimensions=config.allow_dimensions, prompts=prompts)
            # the request's prompt, else the server's default, else the model's (as Encoder.encode chooses)
            prompt = resolve_prompt(encoder.manifest, req.prompt_name or config.default_prompt_name)
            big = sum(map(len, req.texts)) > INLINE_CHARS
            tokens = await off_loop(big, tokenize, req.texts, prompt)
            total = sum(tokens)
            try:
                batcher.check_fits(len(tokens), total)
            except ValueError as exc:
                raise invalid(str(exc), code="request_too_large") from None
            state["arriving"] -= 1
            arriving = False
            try:
                emb = await batcher.submit(req.texts, tokens, prompt=prompt)
            except QueueFull as exc:
                metrics.rejected.labels("queue_full").inc()
                raise APIError(429, f"{exc}; retry later", type="rate_limit_error", code="queue_full",
                               headers=retry) from None
            except Closed as exc:
                metrics.rejected.labels("shutting_down").inc()
                raise APIError(503, str(exc), type="server_error", code="unavailable", headers=retry) from None
            emb = truncate_dimensions(emb, req.dimensions, normalize)
            out = await off_loop(len(tokens) > INLINE_ROWS, lambda: response_body(
                emb, model=names[0], encoding_format=req.encoding_format, prompt_tokens=total))
            metrics.texts.inc(len(tokens))
            metrics.tokens.inc(total)
            status = 200
            return Response(out, media_type=JSON_TYPE)
        except APIError as err:
            status = err.status
            if err.status in (400, 404, 413):
                metrics.rejected.labels("invalid").inc()
            return _error_response(err)
        finally:
            if arriving:
                state["arriving"] -= 1
            state["inflight"] -= 1
            metrics.inflight.dec()
            metrics.requests.labels(str(status)).inc()
            metrics.request_latency.observe(time.perf_counter() - t0)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error_response(unauthorized)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "stableembed"} for n in names]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        ok = batcher.accepting and not state["draining"]
        body = {"status": "ready" if ok else "unavailable", "model": names[0], "dim": encoder.dim,
                "queue_texts": batcher.queued_texts, "queue_tokens": batcher.queued_tokens,
                "inflight_requests": state["inflight"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        param=None, code=kind))

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
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.config = config
    app.state.model_names = names
    app.state.serving = state  # {"inflight": n, "draining": bool}; the runner sets draining on SIGTERM
    return app

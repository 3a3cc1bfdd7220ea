"""Run the app under uvicorn, with a graceful shutdown, and the `stableembed serve` command's flags.

Shutdown (SIGTERM or SIGINT): /ready turns 503 at once, the listening socket closes, requests already
received are batched and answered, then the batcher stops. Requests still running after
`graceful_timeout` seconds are cancelled. uvicorn then re-raises the signal, as it does for every app,
so the process's exit status tells which signal stopped it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from dataclasses import fields
from types import FrameType
from typing import Any

from .._cli_options import add_encoder_options, encoder_options
from .._extras import require
from .config import ServeConfig


def _uvicorn() -> Any:
    for module in ("starlette", "prometheus_client"):  # the rest of the extra, named if missing
        require(module, "serve")
    return require("uvicorn", "serve")


class _GracefulMixin:
    """uvicorn.Server that marks the app as draining (so /ready answers 503) the moment exit is asked."""

    app_state: dict

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app_state["draining"] = True
        super().handle_exit(sig, frame)  # type: ignore[misc]


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, *, graceful_timeout: float = 30.0,
                log_level: str = "info", access_log: bool = False, **uvicorn_kwargs: Any) -> Any:
    """A uvicorn.Server for `app` (from `create_app`); `.run()` blocks, `.handle_exit(signal.SIGTERM, None)`
    starts a graceful shutdown from any thread."""
    uvicorn = _uvicorn()
    cls = type("GracefulServer", (_GracefulMixin, uvicorn.Server), {})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=max(1, round(graceful_timeout)) if graceful_timeout else None,
                            lifespan="on", **uvicorn_kwargs)
    server = cls(config)
    server.app_state = app.state.serving
    return server


class BackgroundServer:
    """The app served by uvicorn in a thread, for tests and benchmarks:

        with BackgroundServer(create_app(encoder)) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="x")...
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any):
        if port == 0:
            port = free_port(host)
        kwargs.setdefault("log_level", "warning")
        self.server = make_server(app, host, port, **kwargs)
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, name="stableembed-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        import time

        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Graceful: as on SIGTERM."""
        import signal

        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the `stableembed serve` command -----------------------------------------------------------------

_HELP = {
    "max_dispatch_tokens": "tokens (unpadded) gathered from requests into one Encoder.encode call",
    "max_dispatch_texts": "texts gathered from requests into one Encoder.encode call",
    "max_wait_ms": "longest wait (ms) of a free worker for companions, while other requests are still arriving",
    "max_queue_texts": "bounded queue: texts waiting before 429",
    "max_queue_tokens": "bounded queue: tokens waiting before 429",
    "max_inputs": "texts per request before 400",
    "max_body_bytes": "request body size before 413",
    "body_timeout_s": "seconds to read one request body before 408 (0: no limit)",
    "max_concurrent_requests": "requests handled at once before 503",
    "batch_size": "Encoder.encode batch_size",
    "workers": "batches encoded at the same time",
    "retry_after_s": "Retry-After seconds on 429/503",
}


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API (needs the serve extra)")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", action="append", default=None, dest="model_names",
                   help="name clients pass as `model` (repeatable; default: the artifact folder's name)")
    add_encoder_options(s)  # --provider, --mode, --threads, --parallel-runs, ...: as `embed`
    s.add_argument("--dimensions", action=argparse.BooleanOptionalAction, default=True,
                   help="accept the `dimensions` parameter (Matryoshka-style truncation)")
    defaults = ServeConfig()
    for f in fields(ServeConfig):
        if f.name in _HELP:
            s.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name), help=f"{_HELP[f.name]} (default %(default)s)")
    s.add_argument("--default-prompt-name", default=None,
                   help="the model's prompt applied to requests without `prompt_name` (default: the model's own "
                        "default prompt, if any)")
    s.add_argument("--api-key", default=os.environ.get("STABLEEMBED_API_KEY"),
                   help="require this bearer token on /v1/* (default: $STABLEEMBED_API_KEY; unset: open)")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown; 0: no limit (default %(default)s)")
    s.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="run the largest batch once before accepting requests, so memory is flat from the first "
                        "request (skipped when one max_length text is over --max-batch-tokens)")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true")
    s.set_defaults(func=cmd_serve)
    return s


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's limits and batching knobs from `stableembed serve`'s parsed flags."""
    return ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name in _HELP},
                       allow_dimensions=args.dimensions, api_key=args.api_key or None,
                       default_prompt_name=args.default_prompt_name)


def cmd_serve(args: argparse.Namespace) -> int:
    _uvicorn()
    from ..runtime import Encoder
    from .app import create_app

    config = serve_config(args)
    encoder = Encoder(args.artifact, **encoder_options(args))
    if args.warm_up:
        encoder.warm_up(config.batch_size)
    app = create_app(encoder, config, model_names=args.model_names)
    server = make_server(app, args.host, args.port, graceful_timeout=args.graceful_timeout,
                         log_level=args.log_level, access_log=args.access_log)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raised SIGINT after a clean shutdown: exit as killed by it, quietly
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return 0

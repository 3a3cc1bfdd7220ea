"""Serving: an OpenAI-compatible HTTP server with dynamic batching (extra `serve`), and a Ray Data recipe
for corpora larger than one machine (extra `ray`).

    from stableembed import Encoder
    from stableembed.serve import create_app, ServeConfig      # Starlette app; run it with uvicorn
    from stableembed.serve.ray_data import embed_files_to_parquet

Importing this package needs neither extra; its parts import theirs on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "make_server", "BackgroundServer", "Batcher", "truncate_dimensions"]

if TYPE_CHECKING:
    from .app import create_app
    from .batcher import Batcher
    from .protocol import truncate_dimensions
    from .server import BackgroundServer, make_server

# name -> (module, third-party modules it needs from the serve extra)
_LAZY = {"create_app": ("app", ("starlette", "prometheus_client")),
         "Batcher": ("batcher", ("prometheus_client",)),
         "truncate_dimensions": ("protocol", ()),
         "make_server": ("server", ("uvicorn", "starlette", "prometheus_client")),
         "BackgroundServer": ("server", ("uvicorn", "starlette", "prometheus_client"))}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        from .._extras import require

        module, needs = _LAZY[name]
        for dep in needs:
            require(dep, "serve")
        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'stableembed.serve' has no attribute {name!r}")

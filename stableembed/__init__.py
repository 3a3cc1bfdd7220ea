"""stableembed: sentence embeddings that are bit-for-bit the same whatever the batch around each text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Encoder", "export_model", "__version__"]

if TYPE_CHECKING:
    from .export import export_model
    from .runtime import Encoder


def __getattr__(name: str) -> Any:
    # Lazy: `import stableembed` stays light; export (torch) loads only when asked for.
    if name == "Encoder":
        from .runtime import Encoder

        return Encoder
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(f"module 'stableembed' has no attribute {name!r}")

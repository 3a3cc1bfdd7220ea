"""Optional dependencies: import them on demand, naming the extra that provides them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed here but not installed; install the extra: pip install 'stableembed[{extra}]'"
        ) from exc

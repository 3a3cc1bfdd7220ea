"""Fixtures for the export tests: tiny random-weight models built locally, each exported once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import Case, TinyZoo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    """Builds tiny model folders and exports them on first request; later requests reuse them."""
    return TinyZoo(tmp_path_factory.mktemp("tiny_models"))


__all__ = ["Case", "tiny_zoo"]

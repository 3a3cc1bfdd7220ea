"""Fixtures for the serving tests: the real all-MiniLM-L6-v2 behind the server, and the offline
reference it must match bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from stableembed import Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_helpers


@pytest.fixture(scope="session")
def serve_encoder(minilm_artifact) -> Encoder:
    return Encoder(minilm_artifact, check_hashes=False)


@pytest.fixture(scope="session")
def reference(minilm_artifact) -> Callable[[list[str]], np.ndarray]:
    """The offline embeddings the server must reproduce bit for bit (a separate Encoder, one call)."""
    enc = Encoder(minilm_artifact, check_hashes=False)
    return lambda texts: enc.encode(list(texts))

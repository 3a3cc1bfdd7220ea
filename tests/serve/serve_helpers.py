"""Helpers for the serving tests: a gated encoder that holds each batch until the test lets it go, so
queue states (full queue, merged batches, requests in flight at shutdown) are reached deterministically
rather than by timing; polling; the OpenAI error shape."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from stableembed import Encoder


class GatedEncoder:
    """The real Encoder's interface and results, but every `encode` waits for `gate` to open; `calls`
    records the texts of each batch, `prompts` its prompt."""

    def __init__(self, encoder: Encoder):
        self.inner = encoder
        self.manifest = encoder.manifest
        self.tokenizer = encoder.tokenizer
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.gate = threading.Event()
        self.calls: list[list[str]] = []
        self.prompts: list[str | None] = []  # the `prompt` of each call (None: not passed)
        self.entered = threading.Semaphore(0)

    def encode(self, texts, batch_size: int = 32, show_progress: bool = False, **prompt) -> np.ndarray:
        self.calls.append(list(texts))
        self.prompts.append(prompt.get("prompt"))
        self.entered.release()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return self.inner.encode(texts, batch_size=batch_size, **prompt)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def error_of(response) -> dict:
    """The OpenAI-shaped error body: {"error": {message, type, param, code}}, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]

"""The OpenAI embeddings API, as this server speaks it: request validation, error bodies, responses.

Request (POST /v1/embeddings, JSON):
    model            required; one of the names the server was started with (else 404 model_not_found)
    input            a string or a list of strings (1 to max_inputs items, none empty); token-id arrays
                     are refused: the model has its own tokenizer
    encoding_format  "float" (default) or "base64" (little-endian float32 bytes, as OpenAI sends them)
    dimensions       optional int, 1..dim: keep the first `dimensions` components, then L2-normalize
                     again when the model's output is normalized (Matryoshka-style truncation)
    prompt_name      optional, one of the model's prompt names (as text-embeddings-inference names the
                     field; the `openai` client sends it through `extra_body`): that prompt goes before
                     every input. Absent: the server's --default-prompt-name, else the model's default.
    user             accepted and ignored

Errors: {"error": {"message", "type", "param", "code"}} with the HTTP status, as OpenAI answers them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from stableembed.runtime.encoder import finish_rows

ENCODING_FORMATS = ("float", "base64")


class APIError(Exception):
    """An error answered as OpenAI does: status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = "input", code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None
    prompt_name: str | None = None


def parse_request(payload: Any, *, model_names: tuple[str, ...], dim: int, max_inputs: int,
                  allow_dimensions: bool = True, prompts: Mapping[str, str] | None = None) -> EmbeddingRequest:
    """Validate a decoded JSON body; raises APIError with the status and message OpenAI would give."""
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object", param=None)
    model = payload.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise invalid("'model' must be a string", param="model")
    if model not in model_names:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                            f"{', '.join(repr(n) for n in model_names)}", param="model", code="model_not_found")

    if "input" not in payload:
        raise invalid("you must provide an input parameter")
    raw = payload["input"]
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise invalid(f"'input' must be a string or a list of strings, not {_json_type(raw)}")
    if not items:
        raise invalid("'input' must not be an empty list")
    if len(items) > max_inputs:
        raise invalid(f"too many inputs: {len(items)}; the maximum is {max_inputs} per request")
    if all(_is_int(t) for t in items) or all(isinstance(t, list) and t and all(map(_is_int, t)) for t in items):
        raise invalid("token-id arrays are not supported: this server tokenizes with the model's own "
                      "tokenizer; send the texts as strings")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise invalid(f"'input[{i}]' is {_json_type(item)}; every input must be a string")
        if not item:
            raise invalid(f"'input[{i}]' is an empty string; every input must be a non-empty string"
                          if isinstance(raw, list) else "'input' must not be an empty string")

    fmt = payload.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ENCODING_FORMATS:
        raise invalid(f"'encoding_format' must be one of {list(ENCODING_FORMATS)}, got {fmt!r}",
                      param="encoding_format")

    dims = payload.get("dimensions")
    if dims is not None:
        if not allow_dimensions:
            raise invalid("this model does not support specifying dimensions", param="dimensions")
        if not isinstance(dims, int) or isinstance(dims, bool):
            raise invalid(f"'dimensions' must be an integer, not {_json_type(dims)}", param="dimensions")
        if not 1 <= dims <= dim:
            raise invalid(f"'dimensions' must be between 1 and {dim} (the model's dimension), got {dims}",
                          param="dimensions")
    prompt_name = payload.get("prompt_name")
    if prompt_name is not None:
        if not isinstance(prompt_name, str):
            raise invalid(f"'prompt_name' must be a string, not {_json_type(prompt_name)}", param="prompt_name")
        known = prompts or {}
        if prompt_name not in known:
            names = ", ".join(repr(n) for n in known) if known else "none (this model defines no prompts)"
            raise invalid(f"unknown 'prompt_name' {prompt_name!r}; this model's prompts: {names}",
                          param="prompt_name", code="prompt_not_found")
    return EmbeddingRequest(model, items, fmt, dims, prompt_name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def truncate_dimensions(emb: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Keep the first `dimensions` components of each row; when `normalize` (the model's output is unit
    length), L2-normalize them again with the batch-invariant kernel, so each row's bits still depend on
    that row alone. `dimensions` None or equal to the width returns `emb` unchanged.

    How much the truncated vectors are worth depends on the model: Matryoshka-trained models keep most of
    their quality in a prefix; others (all-MiniLM-L6-v2 among them) lose more.
    """
    if dimensions is None or dimensions == emb.shape[-1]:
        return emb
    if not 1 <= dimensions <= emb.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {emb.shape[-1]}, got {dimensions}")
    return finish_rows(np.asarray(emb, dtype=np.float32), dimensions, normalize)


def response_body(emb: np.ndarray, *, model: str, encoding_format: str, prompt_tokens: int) -> bytes:
    """The JSON response. Floats are written with Python's shortest round-trip repr of each float32 value
    (widened exactly to float64), so a client parsing them back to float32 gets the server's bits."""
    if encoding_format == "base64":
        data = emb.astype("<f4", copy=False)
        items = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.tobytes()).decode("ascii")}
                 for i, row in enumerate(data)]
    else:
        items = [{"object": "embedding", "index": i, "embedding": row}
                 for i, row in enumerate(emb.tolist())]
    body = {"object": "list", "data": items, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def error_body(err: APIError) -> bytes:
    return json.dumps(err.body()).encode("utf-8")

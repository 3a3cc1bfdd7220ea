"""Server limits and batching knobs; importing this needs none of the serve extra."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ServeConfig:
    """Server limits and batching knobs (the CLI flags of `stableembed serve`)."""

    # One dispatch is one Encoder.encode call over texts gathered from requests; the Encoder cuts it into
    # model runs of at most its own max_batch_tokens (2,048) padded tokens. A dispatch of several runs'
    # worth gives the Encoder's length sort room to group similar lengths.
    max_dispatch_tokens: int = 4096   # tokens (unpadded) of one dispatch
    max_dispatch_texts: int = 256     # texts of one dispatch
    max_wait_ms: float = 5.0          # longest wait for companions (only while other requests arrive)
    max_queue_texts: int = 8192       # bounded queue: texts waiting (beyond: 429)
    max_queue_tokens: int = 1 << 20   # bounded queue: tokens waiting (beyond: 429)
    max_inputs: int = 2048            # texts per request (beyond: 400), as OpenAI
    max_body_bytes: int = 4 << 20     # request body (beyond: 413)
    body_timeout_s: float = 30.0      # reading one request body (beyond: 408; 0: no limit)
    max_concurrent_requests: int = 256  # requests handled at once (beyond: 503)
    batch_size: int = 32              # Encoder.encode's batch_size
    workers: int = 1                  # batches encoded at once
    allow_dimensions: bool = True     # accept `dimensions` (Matryoshka-style truncation)
    retry_after_s: int = 1            # Retry-After on 429 / 503
    api_key: str | None = None        # when set, /v1/* requires "Authorization: Bearer <api_key>" (else 401)
    default_prompt_name: str | None = None  # prompt for requests without `prompt_name` (None: the model's default)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        for name in ("max_inputs", "max_body_bytes", "max_concurrent_requests"):  # 0 would refuse every request
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_inputs > self.max_queue_texts:
            raise ValueError(f"max_inputs ({self.max_inputs}) must not exceed max_queue_texts "
                             f"({self.max_queue_texts}): such a request could never be queued")

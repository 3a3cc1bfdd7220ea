"""Shape planning shared by every GPU path (native TensorRT engines, onnxruntime's CUDA and TensorRT EPs,
and `stableembed build-trt`): the one home of "which shape does a batch run at".

The rule: a batch whose (rows, length) is one of the manifest's fixed buckets (fixed mode) runs at its
length's *run shape* (the largest bucket batch for that length, by default), its missing rows filled
with copies of its first row, so every text of a length bucket runs through the same kernels at one
shape whatever its companions. Any other batch (dynamic mode) runs at its own shape, under an
optimization profile (min/opt/max over batch x length) that holds it.

Pure Python on purpose: nothing here needs a GPU, TensorRT or onnx, so all of it is tested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Shape = tuple[int, int]  # (batch, length)
STATIC_BATCHES = ("largest", "all")


@dataclass(frozen=True)
class Profile:
    """An optimization profile: the batch x length range a dynamic engine (or session) accepts."""

    min: Shape
    opt: Shape
    max: Shape

    def holds(self, rows: int, length: int) -> bool:
        return self.min[0] <= rows <= self.max[0] and self.min[1] <= length <= self.max[1]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def exact(cls, shape: Shape) -> "Profile":
        """The profile that holds one shape only (min = opt = max)."""
        return cls(shape, shape, shape)


def parse_profiles(text: str) -> list[Profile]:
    """'1x1:32x128:64x256,64x1:128x64:256x128' -> profiles (each MIN:OPT:MAX, as BATCHxLENGTH)."""
    out = []
    for part in text.split(","):
        try:
            mn, op, mx = (tuple(int(v) for v in s.lower().split("x")) for s in part.strip().split(":"))
            if not (len(mn) == len(op) == len(mx) == 2):
                raise ValueError
        except ValueError:
            raise ValueError(f"profile {part!r} is not MINBxMINL:OPTBxOPTL:MAXBxMAXL") from None
        out.append(Profile(mn, op, mx))  # type: ignore[arg-type]
    return out


def check_profiles(profiles: Sequence[Profile], max_length: int) -> list[Profile]:
    """Each profile must have 1 <= min <= opt <= max (per axis) and lengths within the model's max_length."""
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    for p in profiles:
        for axis, what in ((0, "batch"), (1, "length")):
            if not 1 <= p.min[axis] <= p.opt[axis] <= p.max[axis]:
                raise ValueError(f"profile {p.as_dict()}: {what} must satisfy 1 <= min <= opt <= max")
        if p.max[1] > max_length:
            raise ValueError(f"profile {p.as_dict()}: max length {p.max[1]} is beyond the model's max_length "
                             f"{max_length}")
    return list(profiles)


def default_profiles(max_length: int, fixed_buckets: Sequence[Sequence[int]]) -> list[Profile]:
    """One profile: 1..max(64, largest bucket batch) rows x 1..max_length tokens, tuned for 32 x 128."""
    max_batch = max([64] + [int(b) for b, _ in fixed_buckets])
    return [Profile((1, 1), (min(32, max_batch), min(128, max_length)), (max_batch, max_length))]


def run_shapes(fixed_buckets: Sequence[Sequence[int]], static_batches: str = "largest") -> list[Shape]:
    """The static shapes fixed-mode batches run at, sorted by length then batch: one per length at its
    largest bucket batch ("largest", the default and the invariant plan) or one per bucket ("all")."""
    if static_batches not in STATIC_BATCHES:
        raise ValueError(f"static_batches must be one of {STATIC_BATCHES}, got {static_batches!r}")
    shapes = {(int(b), int(t)) for b, t in fixed_buckets}
    if static_batches == "largest":
        shapes = {(max(b for b, t in shapes if t == length), length) for _, length in shapes}
    return sorted(shapes, key=lambda s: (s[1], s[0]))


def fixed_shape(rows: int, length: int, fixed_buckets: Sequence[Sequence[int]]) -> Shape | None:
    """The one shape a fixed-mode batch of (rows, length) runs at, or None for a non-bucket (dynamic) batch."""
    buckets = {(int(b), int(t)) for b, t in fixed_buckets}
    if (rows, length) not in buckets:
        return None
    return max(b for b, t in buckets if t == length), length


def pad_rows(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Fill a batch up to `rows` rows with copies of its first row (valid data, as the encoder's fillers)."""
    have = next(iter(feeds.values())).shape[0]
    if have == rows:
        return feeds
    if have > rows:
        raise ValueError(f"a batch of {have} rows does not fit a shape of {rows} rows")
    return {k: np.concatenate([v, np.repeat(v[:1], rows - have, axis=0)]) for k, v in feeds.items()}

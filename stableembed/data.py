"""Bundled real sample texts (package summaries, README paragraphs, unicode), for demo, parity and verify."""

from __future__ import annotations

from importlib import resources


def sample_texts() -> list[str]:
    """The bundled sample, plus the empty string."""
    text = resources.files("stableembed").joinpath("data/sample.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line] + [""]

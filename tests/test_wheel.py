"""What users install is a wheel: build it as `pip install .` does, check that it ships every module and
data file under its installed name, and that a fresh virtual environment holding the wheel and its base
dependencies alone (no torch, no transformers, no extra) loads an artifact and embeds, through Python
and through the `stableembed` command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.runtime.verify import same_bits

REPO = Path(__file__).resolve().parents[1]
# repository folder -> its name inside the wheel (the mapping pyproject.toml/setup.py declare)
MAPPED = {"stableembed": "stableembed", "export": "stableembed/export", "runtime": "stableembed/runtime",
          "kernels": "stableembed/kernels", "serve": "stableembed/serve"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")
TEXTS = ["a wheel, installed as users install it", "", "ünïcödé 🚀", "short"]


def _not_shipped(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo") or path.name.startswith(".")


def expected_files() -> dict[str, Path]:
    """Every file the wheel must hold (each module and each data file), by its path inside the wheel."""
    out = {}
    for folder, installed in MAPPED.items():
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and not _not_shipped(path.relative_to(REPO)):
                out[f"{installed}/{path.relative_to(REPO / folder).as_posix()}"] = path
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a clean copy of the sources (so the build leaves nothing behind
    in the checkout, and needs nothing the copy lacks)."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist = root / "src", root / "dist"
    for folder in MAPPED:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = dist.glob("stableembed-*.whl")
    return whl


def test_wheel_ships_every_module_and_data_file(wheel: Path) -> None:
    expected = expected_files()
    assert "stableembed/runtime/backends/onnxruntime.py" in expected  # the subpackage a hand list once missed
    assert "stableembed/data/sample.txt" in expected and "stableembed/py.typed" in expected
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = {n for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert sorted(set(expected) - names) == [], "missing from the wheel"
        assert sorted(names - set(expected) - dist_info) == [], "in the wheel but not in the source folders"
        for name, path in expected.items():  # each under the right name: the mapping, not just the file name
            assert zf.read(name) == path.read_bytes(), name
        (info,) = {n.split("/", 1)[0] for n in dist_info}
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    assert "stableembed = stableembed.cli:main" in entry_points
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not any(("torch" in line or "transformers" in line) for line in base), base


def _constraints(path: Path) -> Path:
    """This environment's versions as pip constraints: the fresh environment gets the very same numpy,
    onnxruntime and tokenizers (so the same bits), which pip takes from its cache when it has them."""
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "stableembed"})
    path.write_text("\n".join(pins) + "\n")
    return path


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_without_extras(wheel: Path, minilm_artifact: Path, minilm_dir: Path,
                                                     tmp_path: Path) -> None:
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)  # no system site-packages
    python, command = env / "bin" / "python", env / "bin" / "stableembed"
    # this environment's pip installs into the new one (`--python`): no pip bootstrap in the new one
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                          "--constraint", str(_constraints(tmp_path / "constraints.txt")), str(wheel)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    cwd = tmp_path  # not the checkout, whose folders could shadow the installed package

    def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=run_env, cwd=cwd, timeout=300, **kwargs)

    ref = Encoder(minilm_artifact).encode(TEXTS)
    # Python: the installed package, with no extra importable
    code = ("import importlib.util, json, sys, numpy as np, stableembed; from stableembed import Encoder; "
            "print(json.dumps({'file': stableembed.__file__, 'extras': [m for m in ('torch', 'transformers', "
            "'onnx', 'sentence_transformers', 'starlette') if importlib.util.find_spec(m)]})); "
            "np.save(sys.argv[2], Encoder(sys.argv[1]).encode(json.loads(sys.argv[3])))")
    res = run([str(python), "-c", code, str(minilm_artifact), str(tmp_path / "py.npy"), json.dumps(TEXTS)])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert Path(info["file"]).is_relative_to(env) and info["extras"] == [], info
    assert same_bits(np.load(tmp_path / "py.npy"), ref).all()
    # the command: embed from a file, to stdout
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    res = run([str(command), "embed", str(minilm_artifact), "-i", str(tmp_path / "in.txt")])
    assert res.returncode == 0, res.stderr
    rows = np.array([json.loads(line) for line in res.stdout.splitlines()], dtype=np.float32)
    assert rows.shape == ref.shape and same_bits(rows, ref).all()
    res = run([str(command), "verify", str(minilm_artifact), *TEXTS[:2], "--no-subprocess"])
    assert res.returncode == 0 and "verdict: OK" in res.stdout, res.stdout + res.stderr
    # a missing extra is an error that names it
    res = run([str(command), "serve", str(minilm_artifact)])
    assert res.returncode == 2 and "stableembed[serve]" in res.stderr, res.stderr
    res = run([str(command), "export", str(minilm_dir), str(tmp_path / "out")])
    assert res.returncode == 2 and "stableembed[export]" in res.stderr, res.stderr

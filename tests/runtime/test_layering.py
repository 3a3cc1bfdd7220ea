"""Dependencies point one way (serve -> runtime <- export): the runtime never imports stableembed.export,
and the backend modules import each other without cycles, shape planning coming from backends/_shapes.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved; top-level folders such as
    runtime/ and export/ are the subpackages stableembed.runtime, stableembed.export)."""
    rel = path.relative_to(RUNTIME.parent).with_suffix("")
    package = ["stableembed", *rel.parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
                out.update(names)
            elif node.module:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_runtime_module_imports_export() -> None:
    offenders = {str(p.relative_to(RUNTIME.parent)): sorted(m for m in _imports(p) if m.startswith("stableembed.export"))
                 for p in RUNTIME.rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    # the check itself sees relative imports: export/tensorrt.py does import the runtime
    assert "stableembed.runtime.backends._shapes" in _imports(RUNTIME.parent / "export" / "tensorrt.py")


def test_backend_modules_form_no_cycle() -> None:
    backends = {p.stem: p for p in (RUNTIME / "backends").glob("*.py") if p.stem != "__init__"}
    prefix = "stableembed.runtime.backends."
    edges = {name: {m[len(prefix):].split(".")[0] for m in _imports(path) if m.startswith(prefix)} & set(backends)
             for name, path in backends.items()}
    assert "onnxruntime" not in edges["ort_gpu"] or "ort_gpu" not in edges["onnxruntime"]
    assert edges["onnxruntime"] == set()  # the CPU backend imports no other backend
    assert "tensorrt" not in edges["ort_gpu"]  # shape planning comes from _shapes, not from the TensorRT backend
    assert "_shapes" in edges["ort_gpu"] and "_shapes" in edges["tensorrt"] and edges["_shapes"] == set()
    # no cycle at all (depth-first search)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in edges[n]:
            assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n, [n])


@pytest.mark.slow
def test_loading_and_running_the_runtime_imports_no_export_module(minilm_artifact) -> None:
    """In a fresh process: import every runtime module (every backend included), load the artifact, embed."""
    modules = sorted("stableembed.runtime." + ".".join(p.relative_to(RUNTIME).with_suffix("").parts)
                     for p in RUNTIME.rglob("*.py") if p.name != "__init__.py")
    code = (f"import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"from stableembed.runtime.encoder import Encoder\n"
            f"e = Encoder({str(minilm_artifact)!r}, mode='fixed')\n"
            f"assert e.encode(['hello', 'world']).shape == (2, e.dim)\n"
            f"bad = sorted(m for m in sys.modules if m.startswith('stableembed.export'))\n"
            f"print('export modules:', bad)\n"
            f"sys.exit(1 if bad else 0)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "export modules: []" in res.stdout

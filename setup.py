"""Package layout only; the project's metadata lives in pyproject.toml.

The pipeline folders sit at the repository top level and install as subpackages of `stableembed`, so no
generic `runtime`/`export` module lands in site-packages. pyproject.toml alone cannot say that: its
`packages.find` returns names relative to the folder searched (`backends`, not
`stableembed.runtime.backends`), and an explicit `packages` list is what once left
`stableembed.runtime.backends` out of the wheel. So the list is computed here: every package under each
mapped folder, and every non-Python file inside them as package data (tests/test_wheel.py checks the
built wheel against the source tree).
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup

PACKAGE_DIR = {
    "stableembed": "stableembed",
    "stableembed.export": "export",
    "stableembed.runtime": "runtime",
    "stableembed.kernels": "kernels",
    "stableembed.serve": "serve",
}
_NOT_DATA = (".py", ".pyc", ".pyo")


def packages() -> dict[str, str]:
    """Every package (a folder with __init__.py) under the mapped folders -> its folder."""
    found = {}
    for name, folder in PACKAGE_DIR.items():
        found[name] = folder
        for sub in find_packages(folder):
            found[f"{name}.{sub}"] = os.path.join(folder, *sub.split("."))
    return found


def package_data(found: dict[str, str]) -> dict[str, list[str]]:
    """Each package's non-Python files, in its folder and its plain (non-package) subfolders."""
    package_folders = {os.path.normpath(f) for f in found.values()}
    data: dict[str, list[str]] = {}
    for name, folder in found.items():
        for root, dirs, files in os.walk(folder):
            # subpackages own their files; caches are not data
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith(".")
                             and os.path.normpath(os.path.join(root, d)) not in package_folders)
            rel = os.path.relpath(root, folder)
            for f in sorted(files):
                if not f.endswith(_NOT_DATA) and not f.startswith("."):
                    data.setdefault(name, []).append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return data


if __name__ == "__main__":
    _found = packages()
    setup(packages=sorted(_found), package_dir=PACKAGE_DIR, package_data=package_data(_found))

"""The one place benchmark scripts name their machine and file their results.

onnxruntime picks different kernels on different CPUs (AVX2, AVX-512, VNNI, AMX), so a figure without its
CPU means nothing, and a table from one machine type must never overwrite another's. Every script:

    m = machine(cpus)                      # CPU model, family/model, kernel-relevant ISA flags, load...
    announce(m)                            # prints the CPU line to stderr when the run starts
    ...
    save("run", m, data, md)               # results/<machine key>/run.{md,json}, then results/README.md

The CPU itself is read by `stableembed.runtime.machine.cpu_info` (also used by `stableembed info` and
`verify`), so the benchmarks and the runtime name a machine type the same way.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from stableembed.runtime.machine import cpu_info, describe

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "README.md"


def machine(cpus: list[int] | None = None) -> dict[str, Any]:
    """The CPU (see cpu_info), the CPUs this run is pinned to, memory, OS, Python, load average now."""
    mem_kb = 0
    try:
        mem_kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None and hasattr(os, "sched_getaffinity") else cpus
    return {**cpu_info(), "cpus_used": cpus, "memory_gb": round(mem_kb / 2**20, 1), "os": platform.platform(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def cpu_line(m: dict[str, Any]) -> str:
    """'AMD EPYC (family/model 25/1; avx avx2 ...; ISA level avx2), 2 logical CPUs, pinned to [0, 1]'."""
    return (f"{describe(m)}, {m['logical_cpus']} logical CPUs" +
            (f", pinned to {m['cpus_used']}" if m.get("cpus_used") is not None else ""))


def announce(m: dict[str, Any]) -> None:
    print(f"machine {m['key']}: {cpu_line(m)}; load average {m['loadavg_start'][0]:.2f}", file=sys.stderr,
          flush=True)


def save(name: str, m: dict[str, Any], data: dict[str, Any], md: str, out: str | Path | None = None) -> str:
    """Write results/<m['key']>/<name>.{md,json} (or OUT.{md,json}); the JSON gets `machine`, the Markdown a
    first line naming the CPU. Rebuilds the index. Returns the Markdown written."""
    m = dict(m, loadavg_end=os.getloadavg())
    stem = Path(out) if out else RESULTS / m["key"] / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    head = (f"Machine `{m['key']}`: {cpu_line(m)}; load average {m['loadavg_start'][0]:.2f} at the start, "
            f"{m['loadavg_end'][0]:.2f} at the end.")
    md = head + "\n\n" + md.rstrip("\n") + "\n"
    stem.with_name(stem.name + ".md").write_text(md, encoding="utf-8")
    stem.with_name(stem.name + ".json").write_text(json.dumps({**data, "machine": m}, indent=1) + "\n",
                                                   encoding="utf-8")
    if not out:
        write_index()
    return md


def write_index() -> None:
    """results/README.md: one row per machine type with its CPU and its result files."""
    rows = ["# Benchmark results, one folder per machine type", "",
            "A folder name is the machine key of `stableembed.runtime.machine.cpu_info()`: CPU model, family/model "
            "and the ISA level that picks onnxruntime's kernels. Figures compare only within one folder.", "",
            "| machine key | CPU | ISA flags | results (date) |", "|---|---|---|---|"]
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        files, cpu, cpu_date = [], None, ""
        for f in sorted(folder.glob("*.json")):
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            m = d.get("machine") if isinstance(d, dict) else None
            date = str(d.get("date") or d.get("meta", {}).get("date", "")).split("T")[0] if isinstance(d, dict) else ""
            if isinstance(m, dict) and "key" in m and (cpu is None or date >= cpu_date):
                cpu, cpu_date = m, date  # the newest file's reading of the CPU
            md = f.with_suffix(".md")
            files.append(f"[{f.stem}]({folder.name}/{md.name if md.exists() else f.name})" + (f" ({date})" if date else ""))
        for f in sorted(folder.glob("*.txt")):
            files.append(f"[{f.stem}]({folder.name}/{f.name})")
        desc = f"{cpu['cpu']} (family/model {cpu['family_model']})" if cpu else "?"
        flags = " ".join(cpu.get("flags", [])) if cpu else "?"
        rows.append(f"| `{folder.name}` | {desc} | {flags} | {', '.join(files)} |")
    INDEX.write_text("\n".join(rows) + "\n", encoding="utf-8")

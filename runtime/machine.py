"""Which CPU this process runs on, and which instruction sets its kernels can use.

onnxruntime (MLAS) picks its GEMM, softmax and quantized kernels by the CPU's instruction sets at run
time, so the bits of an embedding are promised per machine type (ISA level) and provider, not across
CPUs that dispatch to different kernels. Benchmarks and `stableembed info` / `verify` name the CPU
with this one helper. Standard library only: it reads /proc/cpuinfo (Linux) and falls back to
`platform` elsewhere.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# Flags that change which kernels onnxruntime's CPU provider dispatches to (x86 and Arm names).
KERNEL_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2",
)


def _first_cpu(cpuinfo: str) -> dict[str, str]:
    """The key: value fields of /proc/cpuinfo's first processor block (plus Arm's global lines)."""
    out: dict[str, str] = {}
    for block in cpuinfo.split("\n\n")[:1] + cpuinfo.split("\n\n")[-1:]:
        for line in block.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                out.setdefault(key.strip(), value.strip())
    return out


def isa_level(flags: set[str] | frozenset[str]) -> str:
    """The highest instruction-set tier in `flags` that picks a different family of onnxruntime kernels."""
    ladder = (("amx", {"amx_tile", "amx_int8"}), ("avx512-vnni", {"avx512f", "avx512_vnni"}),
              ("avx512", {"avx512f"}), ("avx2-vnni", {"avx2", "avx_vnni"}), ("avx2", {"avx2", "fma"}),
              ("avx", {"avx"}), ("sve-i8mm", {"sve", "i8mm"}), ("sve", {"sve"}), ("neon-i8mm", {"asimd", "i8mm"}),
              ("neon-dot", {"asimd", "asimddp"}), ("neon", {"asimd"}))
    return next((name for name, need in ladder if need <= flags), "baseline")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU: model name, vendor, family/model, the kernel-relevant flags, the ISA level and a key.

    `key` names the machine type for result files and bit comparisons, e.g. "amd-epyc-25-1-avx2".
    `cpuinfo` is the text of /proc/cpuinfo (read here when None; absent off Linux).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    f = _first_cpu(cpuinfo)
    flags = set((f.get("flags") or f.get("Features") or "").split())
    name = f.get("model name") or f.get("Model") or f.get("Hardware") or platform.processor() or platform.machine()
    vendor = f.get("vendor_id") or f.get("CPU implementer") or ""
    family = f.get("cpu family") or f.get("CPU architecture") or "?"
    model = f.get("model") or f.get("CPU part") or "?"
    level = isa_level(frozenset(flags))
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|\b\d+-core\b|@.*$", "", name.lower())).strip("-")
    key = "-".join(p for p in (slug or platform.machine().lower(), re.sub(r"[^0-9a-z]+", "", family.lower()),
                               re.sub(r"[^0-9a-z]+", "", model.lower()), level) if p and p != "?")
    return {"cpu": name, "vendor": vendor, "family_model": f"{family}/{model}", "arch": platform.machine(),
            "flags": sorted(flags & set(KERNEL_FLAGS)), "isa": level, "key": key,
            "logical_cpus": os.cpu_count()}


def describe(info: dict[str, Any] | None = None) -> str:
    """One line: 'AMD EPYC (family/model 25/1; avx2 fma ...; ISA level avx2)'."""
    i = info or cpu_info()
    return f"{i['cpu']} (family/model {i['family_model']}; {' '.join(i['flags']) or 'no SIMD flags read'}; " \
           f"ISA level {i['isa']})"

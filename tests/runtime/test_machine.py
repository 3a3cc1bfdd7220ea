"""The CPU helper names machine types by the instruction sets that pick onnxruntime's kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stableembed.runtime.machine import cpu_info, describe, isa_level


def _cpuinfo(name: str, vendor: str, family: int, model: int, flags: str) -> str:
    block = (f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {name}\nflags\t\t: fpu sse sse2 {flags}\n")
    return "\n".join(block.format(n=n) for n in range(2))


@pytest.mark.parametrize("name, vendor, family, model, flags, isa, key", [
    ("AMD EPYC", "AuthenticAMD", 25, 1, "sse4_2 avx avx2 fma f16c", "avx2", "amd-epyc-25-1-avx2"),
    ("AMD EPYC 9B14 96-Core Processor", "AuthenticAMD", 25, 17, "avx avx2 fma avx512f avx512bw avx512_vnni",
     "avx512-vnni", "amd-epyc-9b14-25-17-avx512-vnni"),
    ("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "GenuineIntel", 6, 143,
     "avx avx2 fma avx512f avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16", "amx",
     "intel-xeon-platinum-8480-6-143-amx"),
    ("Intel(R) Core(TM) i7-12700", "GenuineIntel", 6, 151, "avx avx2 fma avx_vnni", "avx2-vnni",
     "intel-core-i7-12700-6-151-avx2-vnni"),
    ("Old", "GenuineIntel", 6, 1, "sse4_2", "baseline", "old-6-1-baseline"),
])
def test_keys_and_levels(name, vendor, family, model, flags, isa, key) -> None:
    info = cpu_info(_cpuinfo(name, vendor, family, model, flags))
    assert info["isa"] == isa and info["key"] == key
    assert info["family_model"] == f"{family}/{model}"
    assert "fpu" not in info["flags"] and set(info["flags"]) <= set(flags.split())  # only kernel-relevant flags
    assert f"ISA level {isa}" in describe(info) and name in describe(info)


def test_arm_and_unreadable() -> None:
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\nCPU implementer\t: 0x41\n" \
          "CPU architecture: 8\nCPU part\t: 0xd40\n"
    info = cpu_info(arm)
    assert info["isa"] == "sve-i8mm" and info["key"].endswith("-8-0xd40-sve-i8mm")
    assert isa_level(frozenset({"asimd", "asimddp"})) == "neon-dot"
    empty = cpu_info("")
    assert empty["isa"] == "baseline" and empty["key"]


def test_this_machine_and_lean_import() -> None:
    info = cpu_info()
    assert info["key"] and info["isa"] and info["logical_cpus"] >= 1
    # `stableembed info` and the benchmarks' parent processes read the CPU without onnxruntime or numpy
    code = ("import sys; from stableembed.runtime.machine import cpu_info; cpu_info(); "
            "bad = [m for m in ('onnxruntime', 'numpy', 'tokenizers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

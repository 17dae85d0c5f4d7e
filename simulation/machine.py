"""The machine a number was measured on: the CPU's model and the SIMD flags ONNX Runtime's integer
kernels depend on (x86 VNNI/AMX, Arm dot product / i8mm). A latency or perplexity of an integer
model without them cannot be compared with another machine's (README, "The phone's runtime")."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@functools.cache
def cpu_fields() -> dict[str, str]:
    """lscpu's fields (it also names Arm cores, which /proc/cpuinfo does not), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}
    if "model name" in fields and "flags" in fields:
        return fields
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for ln in info.splitlines():
        k, _, v = ln.partition(":")
        k = k.strip().lower()
        k = "flags" if k == "features" else k            # Arm names its flags "Features"
        if v and k in ("model name", "flags"):
            fields.setdefault(k, v.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), e.g. "AMD EPYC"."""
    return cpu_fields().get("model name") or platform.processor() or "unknown"


def simd_flags() -> list[str]:
    """Which of SIMD_FLAGS this CPU has."""
    flags = set(cpu_fields().get("flags", "").split())
    return [f for f in SIMD_FLAGS if f in flags]

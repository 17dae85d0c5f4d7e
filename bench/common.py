"""What several benchmarks share: where they write, the machine a timing was taken on, a quiet
environment for Flower/Ray/Hugging Face, min-max QParams, and atomic JSON results."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The CPU features an integer kernel's speed depends on (x86 VNNI/AMX, Arm dot product / i8mm):
# a latency without them cannot be compared with another machine's.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}


def quiet_env() -> None:
    """No telemetry, update checks or downloads (the benchmarks use cached models); set before
    Flower or Ray is imported, and inherited by worker processes. A value already set is kept."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def cache_dir() -> Path:
    """``$FEDQUANT_CACHE`` (default ~/.cache/fedquant) / bench: exports the benchmarks reuse."""
    return Path(os.environ.get("FEDQUANT_CACHE") or Path.home() / ".cache" / "fedquant") / "bench"


def shown_path(path) -> str:
    """``path`` as a results file records it: under the home directory as ``~/...``, so that a
    committed result names no developer's machine (the cache lives in ``~/.cache/fedquant``)."""
    p, home = Path(path), Path.home()
    return f"~/{p.relative_to(home).as_posix()}" if p.is_absolute() and p.is_relative_to(home) else str(p)


@functools.cache
def _cpu_fields() -> dict[str, str]:
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
    return _cpu_fields().get("model name") or platform.processor() or "unknown"


def simd_flags() -> list[str]:
    """Which of SIMD_FLAGS this CPU has."""
    flags = set(_cpu_fields().get("flags", "").split())
    return [f for f in SIMD_FLAGS if f in flags]


def versions(packages) -> dict[str, str | None]:
    """Installed version of each package (None when missing)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine(**extra) -> dict:
    """``simulation.quality.machine_info`` (architecture, cores, python, torch and its threads) with
    the CPU's model name and SIMD flags, which every latency needs beside it; ``extra`` added."""
    from simulation.quality import machine_info

    return dict(machine_info(), cpu_model=cpu_model(), simd=simd_flags(), **extra)


def minmax_points(ranges: dict[str, tuple[float, float]], specs) -> dict:
    """Min-max QParams points from observed ``(lo, hi)`` per key; ``specs`` is one QuantSpec for
    every key or a dict of them."""
    from quant.affine import range_to_qparams
    from quant.qparams import PointParams

    out = {}
    for k, (lo, hi) in ranges.items():
        spec = specs[k] if isinstance(specs, dict) else specs
        out[k] = PointParams(spec, *range_to_qparams(lo, hi, spec))
    return out


def write_json(path: Path, data) -> Path:
    """``data`` as indented JSON at ``path``, atomically (``quant.qparams.atomic_write_bytes``): a
    benchmark killed while writing leaves the previous result whole, never half of a new one."""
    from quant.qparams import atomic_write_bytes

    return atomic_write_bytes(path, json.dumps(data, indent=1).encode())

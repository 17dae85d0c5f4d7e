"""What several benchmarks share: where they write, the machine a timing was taken on, a quiet
environment for Flower/Ray/Hugging Face, min-max QParams, paths and command lines as a results file
shows them, and atomic JSON results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

# The CPU's model and the SIMD flags an integer kernel's speed depends on: a latency without them
# cannot be compared with another machine's (simulation/machine.py, shared with summary.json).
from simulation.machine import SIMD_FLAGS, cpu_fields, cpu_model, simd_flags

__all__ = ["SIMD_FLAGS", "cpu_fields", "cpu_model", "simd_flags"]   # re-exported for the benches

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

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


def shown_run(run: Path) -> str:
    """The run directory as a results file records it: ``runs/NAME`` for a run in any checkout's
    runs/ folder (no developer's absolute path), else relative to this checkout or ``~/...``."""
    p = run.resolve()
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    return f"runs/{p.name}" if p.parent.name == "runs" else shown_path(p)


def command_line(module: str, argv) -> str:
    """The command that made a results file: ``python -m MODULE ARGS``, absolute run paths shown as
    `shown_run` shows them (``argv`` None means this process's own arguments)."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python -m", module, *(shown_run(Path(a)) if Path(a).is_absolute() else a for a in args)])


class RunTexts(NamedTuple):
    """A finished run's config and texts as its server builds them (``finished_run``)."""
    cfg: object               # simulation.config.SimulationConfig, with the asked evaluation sizes
    tokenizer: object
    clients: list             # simulation.fleet's clients (their train and test windows)
    evals: object             # held-out windows, across the held-out roles
    ood: object               # out-of-domain windows (the Factbook)
    about: dict               # build_fleet's description (eval_documents, eval_ids, ...)
    ood_ids: list             # which country and offset each out-of-domain window is
    own: tuple                # the run's own (eval_sequences, ood_sequences)


def finished_run(run: Path, eval_sequences: int | None = None, ood_sequences: int | None = None) -> RunTexts:
    """A ``fedquant simulate`` run directory's config with its evaluation text sizes replaced (None:
    the run's own), and its texts as its server builds them. SystemExit for what is not a run
    directory."""
    from simulation.config import SimulationConfig
    from simulation.fleet import build_fleet, ood_sequences as ood_windows
    from simulation.models import load_model
    from simulation.prepare import RUN_FORMAT

    meta_file = run / "run.json"
    if not meta_file.is_file():
        raise SystemExit(f"{run}: no run.json: not a fedquant simulate run directory")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != RUN_FORMAT:
        raise SystemExit(f"{meta_file}: format {meta.get('format')!r}, expected {RUN_FORMAT!r}")
    conf = meta["config"]
    own = (conf["data"].get("eval_sequences"), conf["data"].get("ood_sequences"))
    sizes = {k: v for k, v in (("eval_sequences", eval_sequences), ("ood_sequences", ood_sequences)) if v is not None}
    conf["data"] = {**conf["data"], **sizes}
    cfg = SimulationConfig.model_validate(conf)
    _, tokenizer = load_model(cfg.model)
    clients, evals, about = build_fleet(cfg.data, tokenizer, [(e.load().name, e.share) for e in cfg.fleet])
    ood, ood_ids = ood_windows(cfg.data, tokenizer)
    return RunTexts(cfg, tokenizer, clients, evals, ood, about, ood_ids, own)


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
    """``simulation.quality.machine_info`` (architecture, CPU model and SIMD flags, cores, python,
    torch and its threads) with ``extra`` added."""
    from simulation.quality import machine_info

    return dict(machine_info(), **extra)


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

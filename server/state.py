"""The server's run state and its checkpoint file (design.md section 8).

The state is everything a resumed run needs to continue bit for bit: the last round done, the
global QParams of each profile, the histogram grids and the running statistics sums, each
profile's float ``(log s, beta)`` and FedAdam moments, the client ids that already contributed
statistics, and the digest of the config (and initial QParams) that made it.

``metrics.jsonl`` holds one JSON line per round done (``append_metrics``, flushed and fsynced); a
resumed run first drops the lines of rounds after its checkpoint (``trim_metrics``).

The checkpoint is one safetensors file: arrays as tensors (named ``t0, t1, ...``) and one JSON
string in the header metadata that gives the structure and points at them. No pickle. It is written
atomically (``quant.qparams.atomic_write_bytes``), so a crash leaves the previous checkpoint or the
new one, never half of one. Serialisation walks everything in sorted order, so equal states give
equal files; :func:`states_equal` compares states that way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from quant.qparams import PointParams, QParams, atomic_write_bytes, pack_codes, safetensors_metadata, unpack_codes
from quant.spec import QuantSpec
from quant.stats import ActivationStats, Grid

FORMAT = "fedquant.server-state/1"
Arrays = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


@dataclass(frozen=True)
class RunState:
    """The run after ``round`` rounds. Treated as immutable: every update makes a new one.

    ``learned[profile]`` holds ``log_s/<key>`` and ``beta/<key>`` (float64) of the points the
    learned-range rounds move, once such a round ran on the profile's current QParams;
    ``moments[profile]`` FedAdam's ``m/...`` and ``v/...`` for the same names."""

    round: int
    qparams: Mapping[str, QParams]
    digest: str
    grids: Mapping[str, Grid] = field(default_factory=dict)
    sums: Mapping[str, ActivationStats] = field(default_factory=dict)
    learned: Mapping[str, Arrays] = field(default_factory=dict)
    moments: Mapping[str, Arrays] = field(default_factory=dict)
    used: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "used", tuple(sorted(set(self.used))))


def initial_state(initial: Mapping[str, QParams], digest: str) -> RunState:
    """Round 0: the initial QParams of every profile, nothing else."""
    if not initial:
        raise ValueError("no initial QParams: give at least one profile")
    for name, qp in initial.items():
        try:
            qp.validate()
        except ValueError as e:
            raise ValueError(f"initial QParams of profile {name!r}: {e}") from None
    return RunState(0, dict(initial), digest)


def run_digest(config_digest: str, initial: Mapping[str, QParams]) -> str:
    """The digest a run's checkpoints carry: its config's and its initial QParams' (16 hex)."""
    import hashlib

    arrays, meta = _flatten(RunState(0, dict(initial), ""))
    h = hashlib.sha256(config_digest.encode())
    h.update(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        h.update(k.encode() + arrays[k].dtype.str.encode() + arrays[k].tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Canonical flattening: (arrays, structure)

class _Tensors:
    def __init__(self):
        self.arrays: Arrays = {}

    def put(self, a) -> list:
        a = np.asarray(a)
        name = f"t{len(self.arrays)}"
        self.arrays[name] = np.ascontiguousarray(a.reshape(-1))
        return [name, [int(d) for d in a.shape]]


def _flatten(state: RunState) -> tuple[Arrays, dict]:
    t = _Tensors()
    qparams = {}
    for prof in sorted(state.qparams):
        qp = state.qparams[prof]
        qparams[prof] = {
            "model": qp.model, "version": int(qp.version), "meta": dict(sorted(qp.meta.items())),
            "points": [[k, p.spec.model_dump(mode="json"), t.put(p.scale), t.put(p.zero_point)]
                       for k, p in sorted(qp.points.items())],
            "smoothing": [[k, t.put(np.asarray(v))] for k, v in sorted(qp.smoothing.items())]}
        if qp.importance:       # absent when empty: checkpoints of runs without it stay as they were
            qparams[prof]["importance"] = [[k, t.put(np.asarray(v))] for k, v in sorted(qp.importance.items())]
        if qp.codes:            # GPTQ's integer weights, two 4-bit codes a byte (quant.qparams.pack_codes)
            qparams[prof]["codes"] = [[k, list(np.shape(c)), t.put(pack_codes(c, qp.points[k].spec))]
                                      for k, c in sorted(qp.codes.items())]
    grids = [[k, t.put(np.array([g.lo, g.hi], dtype=np.float64)), g.bins] for k, g in sorted(state.grids.items())]
    sums = [[k, t.put(np.array([s.lo, s.hi, s.min, s.max], dtype=np.float64)), t.put(s.counts),
             t.put(np.array([s.below, s.above, s.n], dtype=np.int64))] for k, s in sorted(state.sums.items())]

    def named(d: Mapping[str, Arrays]) -> dict:
        return {prof: [[k, t.put(np.asarray(v, dtype=np.float64))] for k, v in sorted(d[prof].items())]
                for prof in sorted(d)}

    meta = {"format": FORMAT, "round": int(state.round), "digest": state.digest, "used": list(state.used),
            "qparams": qparams, "grids": grids, "sums": sums,
            "learned": named(state.learned), "moments": named(state.moments)}
    return t.arrays, meta


def _unflatten(arrays: Arrays, meta: dict) -> RunState:
    def get(ref) -> np.ndarray:
        name, shape = ref
        return arrays[name].reshape(tuple(shape))

    qparams = {}
    for prof, q in meta["qparams"].items():
        points = {k: PointParams(QuantSpec.model_validate(spec), get(s), get(z)) for k, spec, s, z in q["points"]}
        qp = QParams(points, q["model"], int(q["version"]), {k: get(r) for k, r in q["smoothing"]},
                     dict(q["meta"]), {k: get(r) for k, r in q.get("importance", [])},
                     {k: unpack_codes(get(r), tuple(shape), points[k].spec) for k, shape, r in q.get("codes", [])})
        qp.validate()
        qparams[prof] = qp
    grids = {}
    for k, ref, bins in meta["grids"]:
        lo, hi = get(ref)
        grids[k] = Grid(float(lo), float(hi), int(bins))
    sums = {}
    for k, f_ref, c_ref, i_ref in meta["sums"]:
        lo, hi, mn, mx = get(f_ref)
        counts = get(c_ref)
        below, above, n = get(i_ref)
        st = ActivationStats.from_arrays({"lo_hi": np.array([lo, hi]), "counts": counts,
                                          "below_above": np.array([below, above]),
                                          "min_max": np.array([mn, mx]), "n": np.array(n)})
        sums[k] = st
    learned = {p: {k: get(r) for k, r in rows} for p, rows in meta["learned"].items()}
    moments = {p: {k: get(r) for k, r in rows} for p, rows in meta["moments"].items()}
    return RunState(int(meta["round"]), qparams, str(meta["digest"]), grids, sums, learned, moments,
                    tuple(str(u) for u in meta["used"]))


def states_equal(a: RunState, b: RunState) -> bool:
    """Bit for bit: the same structure and the same arrays (dtype included)."""
    (xa, ma), (xb, mb) = _flatten(a), _flatten(b)
    return ma == mb and xa.keys() == xb.keys() and all(
        xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]) for k in xa)


# ---------------------------------------------------------------------------------------------
# File

def save_checkpoint(state: RunState, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    from safetensors.numpy import save

    arrays, meta = _flatten(state)
    return atomic_write_bytes(path, save(arrays, metadata={"state": json.dumps(meta, sort_keys=True)}))


def load_checkpoint(path: str | os.PathLike, expect_digest: str | None = None) -> RunState:
    """Read a checkpoint; with ``expect_digest``, refuse one written under another config.
    Raises :class:`CheckpointError` naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    try:
        arrays = load(raw)
        meta_s = safetensors_metadata(raw).get("state")
        meta = json.loads(meta_s) if isinstance(meta_s, str) else None
    except (SafetensorError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint (corrupt or truncated safetensors: "
                              f"{str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: no run state in the safetensors metadata")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {str(meta.get('format'))[:60]!r}, expected {FORMAT!r}")
    if expect_digest is not None and meta.get("digest") != expect_digest:
        raise CheckpointError(f"{path}: written by another config (digest {meta.get('digest')!r}, this "
                              f"run's is {expect_digest!r}); use a new output directory or the same "
                              f"config and initial QParams")
    try:
        return _unflatten(arrays, meta)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: inconsistent run state ({type(e).__name__}: {str(e)[:200]})") from None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl

def trim_metrics(path: str | os.PathLike, upto: int) -> None:
    """Keep the metrics lines of rounds ``<= upto`` (a resumed run redoes the later ones)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue                # a line cut by a crash
        if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= upto:
            keep.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def json_safe(x):
    """JSON-safe: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def append_metrics(path: str | os.PathLike, row: dict) -> None:
    """Append one round's line to ``metrics.jsonl`` and make it durable before the next round."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

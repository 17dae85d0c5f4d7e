"""QParams: the quantization parameters of one model for one device profile, and their file format.

Keys are stable, readable names of quantization points: ``<module path>:input`` for the activation
entering an nn.Linear and ``<module path>:weight`` for its weight (design.md section 5), e.g.
``model.layers.0.self_attn.q_proj:input``. A QParams also carries per-channel smoothing factors
(SmoothQuant) keyed by the Linear whose input they scale, the fingerprint of the model it was made
for, and a version number that only grows. A weight point may carry its integer codes (``codes``:
GPTQ's rounding, ``quant.gptq``, which is not the nearest point of the grid a device would round its
own weight to); without them a device rounds its weight to the nearest.

On disk it is one safetensors file: the arrays as tensors and everything else as JSON in the header
metadata. No pickle. Writes go to a temporary file that is flushed and renamed, so a crash leaves
either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from quant.rotation import ROTATION_META, rotation_of
from quant.spec import SCALE_FLOOR, QuantSpec

FORMAT = "fedquant.qparams/1"
# The largest scale a device loads: the int32 bias of a quantized matmul has scale s_x * s_w, and
# two scales up to 2^64 keep it finite in float32 (below 2^128); SCALE_FLOOR (2^-24) keeps it far
# from float32's subnormals. No calibrator or learned range of a working model comes near either.
SCALE_CEIL = 2.0**64
# Smoothing factors a device loads: x / m and W * m stay finite for any sane activation or weight.
FACTOR_BOUNDS = (2.0**-64, 2.0**64)


@dataclass(frozen=True)
class PointParams:
    """Scale and zero-point of one quantization point, with the spec they belong to."""

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32))
        z = np.asarray(self.zero_point)
        # Check before casting: a cast to uint8 would turn 300 into 44 and -1 into 255.
        if z.dtype.kind not in "iu":
            if not np.all(np.isfinite(z)) or not np.all(z == np.round(z)):
                raise ValueError(f"zero_point must hold integers, got {z.ravel()[:3].tolist()}")
        if z.size and (z.min() < self.spec.qmin or z.max() > self.spec.qmax):
            raise ValueError(f"zero_point outside [{self.spec.qmin}, {self.spec.qmax}] of "
                             f"{self.spec.onnx_type_name}: {z.ravel()[:3].tolist()}")
        object.__setattr__(self, "zero_point", z.astype(self.spec.numpy_dtype))

    def validate(self, key: str) -> None:
        """Raise ValueError naming ``key`` if the parameters cannot be used as they are."""
        s, z = self.scale, self.zero_point
        if s.shape != z.shape:
            raise ValueError(f"{key}: scale shape {s.shape} != zero_point shape {z.shape}")
        if self.spec.granularity == "per_tensor" and s.shape != ():
            raise ValueError(f"{key}: per_tensor scale must be a scalar, got shape {s.shape}")
        if self.spec.granularity == "per_channel" and s.ndim != 1:
            raise ValueError(f"{key}: per_channel scale must be 1-D, got shape {s.shape}")
        if not np.all(np.isfinite(s)) or not np.all(s > 0):
            raise ValueError(f"{key}: scales must be finite and positive")
        zi = z.astype(np.int64)
        if np.any(zi < self.spec.qmin) or np.any(zi > self.spec.qmax):
            raise ValueError(f"{key}: zero_point outside [{self.spec.qmin}, {self.spec.qmax}]")
        if self.spec.symmetric and np.any(zi != self.spec.symmetric_zero_point):
            raise ValueError(f"{key}: symmetric spec needs zero_point {self.spec.symmetric_zero_point}")


PER_TOKEN_META = "per_token"   # meta key: JSON list of the Linears whose input is quantized per token


ROTATED_META = "rotated"       # meta key: JSON list of the Linears whose static input is rotated


def _linear_list(qp: "QParams", key: str) -> list[str]:
    raw = qp.meta.get(key)
    if not raw:
        return []
    try:
        paths = json.loads(raw)
    except ValueError:
        paths = None
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and ":" not in p for p in paths):
        raise ValueError(f"meta[{key!r}] must be a JSON list of Linear paths, got {raw[:80]!r}")
    return sorted(paths)


def per_token_linears(qp: "QParams") -> list[str]:
    """The Linears whose input is quantized per token at run time (``meta["per_token"]``, set by
    ``quant.instrument.get_qparams``): they have a ``:weight`` point and no ``:input`` point, and
    the QDQ graph quantizes their input per token (``quant.qdq.per_token_inputs``)."""
    return _linear_list(qp, PER_TOKEN_META)


def rotated_linears(qp: "QParams") -> list[str]:
    """The Linears whose static input (a QParams ``:input`` point) is rotated before it is quantized
    (``meta["rotated"]``, ``QuantConfig.rotate``): the point's range is of ``(x / m) R``, the
    weight point of ``(W * m) R`` (``quant.rotation``; per-token Linears are rotated by
    ``meta["per_token_rotation"]`` alone)."""
    return _linear_list(qp, ROTATED_META)


def rotation_block(qp: "QParams", path: str) -> int:
    """The block ``quant.rotation`` rotates Linear ``path``'s input and weight in (its width
    decides the block actually used): ``meta["per_token_rotation"]`` for a per-token or rotated
    Linear, else 0."""
    return rotation_of(qp.meta) if path in per_token_linears(qp) or path in rotated_linears(qp) else 0


@dataclass
class QParams:
    """All quantization parameters of one model for one device profile."""

    points: dict[str, PointParams]
    model: str = ""  # fingerprint of the model the keys belong to (see model_fingerprint)
    version: int = 0
    smoothing: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    # per Linear, the mean square of each input channel as the fleet measured it (E[x_j^2] of the
    # float input): its weight point is then the range with the least rounding error weighted by
    # it (quant.weight_ranges), derived alike by the server and every device; absent: min-max
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    # per weight point (``<path>:weight``), its integer codes in the weight's own layout (out, in),
    # of the smoothed and rotated weight the graph quantizes: valid with that point only (a new
    # point without codes drops them: ``with_points``)
    codes: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self) -> None:
        for key, p in self.points.items():
            if ":" not in key:
                raise ValueError(f"{key}: a point key is '<module path>:input' or ':weight'")
            p.validate(key)
        for key, f in self.smoothing.items():
            f = np.asarray(f)
            if f.ndim != 1 or not np.all(np.isfinite(f)) or not np.all(f > 0):
                raise ValueError(f"smoothing {key}: factors must be a 1-D finite positive array")
        for key, h in self.importance.items():
            h = np.asarray(h)
            if h.ndim != 1 or not np.all(np.isfinite(h)) or not np.all(h >= 0):
                raise ValueError(f"importance {key}: must be a 1-D finite non-negative array")
        for key, c in self.codes.items():
            codes_problem = _codes_problem(key, c, self.points.get(key))
            if codes_problem:
                raise ValueError(codes_problem)
        both = [p for p in per_token_linears(self) if f"{p}:input" in self.points]
        if both:
            raise ValueError(f"{both[0]}: its input is quantized per token and also has a point ({both[0]}:input)")
        rotated = rotated_linears(self)
        if rotated and not rotation_of(self.meta):
            raise ValueError(f"meta[{ROTATED_META!r}] names {len(rotated)} Linears but "
                             f"meta[{ROTATION_META!r}] gives no rotation block")
        also = sorted(set(rotated) & set(per_token_linears(self)))
        if also:
            raise ValueError(f"{also[0]}: listed both as per-token and as a rotated static input")

    def with_points(self, updates: dict[str, PointParams], version: int | None = None,
                    codes: Mapping[str, np.ndarray] | None = None) -> "QParams":
        """A copy with some points replaced (and the codes of the replaced ones dropped, unless
        ``codes`` gives new ones); the original is untouched."""
        kept = {k: c for k, c in self.codes.items() if k not in updates}
        return QParams({**self.points, **updates}, self.model,
                       self.version if version is None else version, dict(self.smoothing),
                       dict(self.meta), dict(self.importance), {**kept, **dict(codes or {})})


def _codes_problem(key: str, codes, point: "PointParams | None") -> str | None:
    """Why ``codes`` cannot be the integer weight of ``point`` (None when they can): a weight point
    of the QParams, an integer (out, in) array within the spec's range whose shape the scales fit."""
    if point is None or not key.endswith(":weight"):
        return f"codes {key}: not a weight point of these QParams"
    c = np.asarray(codes)
    if c.ndim != 2 or c.dtype.kind not in "iu":
        return f"codes {key}: must be a 2-D integer array (out, in), got {c.dtype} of shape {c.shape}"
    try:
        want = point.spec.param_shape(c.shape)
    except ValueError as e:
        return f"codes {key}: shape {c.shape} does not fit spec {point.spec.short()} ({e})"
    if tuple(want) != point.scale.shape:
        return f"codes {key}: shape {c.shape} needs scales of shape {tuple(want)}, the point has {point.scale.shape}"
    if c.size and (int(c.min()) < point.spec.qmin or int(c.max()) > point.spec.qmax):
        return f"codes {key}: values outside [{point.spec.qmin}, {point.spec.qmax}] of {point.spec.onnx_type_name}"
    return None


def qparams_problems(qp: "QParams", held: "QParams | None" = None,
                     in_features: Mapping[str, int] | None = None, respec: bool = False) -> list[str]:
    """Every reason a device refuses to load ``qp`` over the QParams it holds (``held``); empty when
    there is none. The one check both the device's patch (``client.runtime``) and the server's
    commit (``server.rounds``) apply, so the server never commits, nor checkpoints, parameters that
    every phone would then refuse.

    ``qp.validate()`` (alone when it fails: the rest assumes well-formed points); scales within
    ``[SCALE_FLOOR, SCALE_CEIL]`` and smoothing factors within ``FACTOR_BOUNDS``, both as the
    float32 a runtime stores; with ``held``: a version not older, the same model, known keys, the
    same spec and scale shape per point (``respec``: a point may change its spec, the mixed-precision
    plan's change, which a device takes by rebuilding its graph); with ``in_features`` (Linear path
    -> its input features): one smoothing factor per input."""
    try:
        qp.validate()
    except ValueError as e:
        return [str(e)]
    errors = []
    for key, p in qp.points.items():
        s = np.asarray(p.scale, np.float32)
        if s.size and (s.min() < SCALE_FLOOR or s.max() > SCALE_CEIL):
            errors.append(f"{key}: scales {float(s.min()):.3g} to {float(s.max()):.3g} outside "
                          f"[2^-24, 2^64]")
    lo, hi = FACTOR_BOUNDS
    for path, m in qp.smoothing.items():
        with np.errstate(over="ignore", under="ignore"):
            f = np.asarray(m).astype(np.float32)
        if f.size and not (np.all(np.isfinite(f)) and f.min() >= lo and f.max() <= hi):
            errors.append(f"smoothing {path}: factors outside [2^-64, 2^64] as float32")
        n = (in_features or {}).get(path)
        if n is not None and f.shape != (n,):
            errors.append(f"smoothing {path}: {f.shape} factors for {n} inputs")
    for path, h in qp.importance.items():
        with np.errstate(over="ignore"):
            h32 = np.asarray(h).astype(np.float32)
        if not np.all(np.isfinite(h32)):
            errors.append(f"importance {path}: not finite as float32")
        n = (in_features or {}).get(path)
        if n is not None and h32.shape != (n,):
            errors.append(f"importance {path}: {h32.shape} values for {n} inputs")
    for key, c in qp.codes.items():
        n = (in_features or {}).get(key.rsplit(":", 1)[0])
        if n is not None and np.shape(c)[1] != n:
            errors.append(f"codes {key}: {np.shape(c)[1]} columns for {n} inputs")
    if held is not None:
        if int(qp.version) < int(held.version):
            errors.append(f"version {qp.version} is older than the held version {held.version}")
        if qp.model and held.model and qp.model != held.model:
            errors.append(f"QParams are for model {qp.model!r}, this runtime holds {held.model!r}")
        if PER_TOKEN_META in qp.meta and per_token_linears(qp) != per_token_linears(held):
            errors.append(f"per-token inputs {per_token_linears(qp)[:3]} differ from the runtime's "
                          f"{per_token_linears(held)[:3]} (a different graph)")
        if ROTATED_META in qp.meta and rotated_linears(qp) != rotated_linears(held):
            errors.append(f"rotated inputs {rotated_linears(qp)[:3]} differ from the runtime's "
                          f"{rotated_linears(held)[:3]} (a different graph)")
        if ROTATION_META in qp.meta:
            try:
                mine, theirs = rotation_of(qp.meta), rotation_of(held.meta)
            except ValueError as e:
                errors.append(str(e))
            else:
                if mine != theirs:
                    errors.append(f"per-token rotation block {mine} differs from the runtime's {theirs} "
                                  "(a different graph)")
        unknown = sorted(set(qp.points) - set(held.points))
        if unknown:
            errors.append(f"unknown keys (not quantization points of this model): {unknown[:5]}")
        for key, p in qp.points.items():
            old = held.points.get(key)
            if old is None:
                continue
            if p.spec != old.spec and respec:
                continue
            if p.spec != old.spec:
                errors.append(f"{key}: spec {p.spec.short()} differs from the runtime's "
                              f"{old.spec.short()} (a different profile needs a different model)")
            elif p.scale.shape != old.scale.shape:
                errors.append(f"{key}: scale shape {p.scale.shape} != {old.scale.shape}")
    return errors


def model_fingerprint(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """A short hash of the quantizable modules' names and weight shapes: QParams made for one model
    are refused by another."""
    h = hashlib.sha256()
    for name, shape in sorted(named_shapes):
        h.update(f"{name}:{tuple(int(d) for d in shape)};".encode())
    return h.hexdigest()[:16]


def save_qparams(qp: QParams, path: str | os.PathLike) -> Path:
    """Write ``qp`` to ``path`` atomically (temp file, fsync, rename)."""
    from safetensors.numpy import save

    qp.validate()
    tensors, specs = {}, {}
    for key, p in qp.points.items():
        tensors[f"{key}/scale"] = np.ascontiguousarray(p.scale)
        tensors[f"{key}/zero_point"] = np.ascontiguousarray(p.zero_point)
        specs[key] = p.spec.model_dump(mode="json")
    for key, f in qp.smoothing.items():
        tensors[f"smoothing/{key}"] = np.ascontiguousarray(np.asarray(f, dtype=np.float32))
    for key, h in qp.importance.items():
        tensors[f"importance/{key}"] = np.ascontiguousarray(np.asarray(h, dtype=np.float32))
    for key, c in qp.codes.items():
        tensors[f"codes/{key}"] = pack_codes(c, qp.points[key].spec)
    header = {"format": FORMAT, "model": qp.model, "version": str(int(qp.version)),
              "specs": json.dumps(specs, sort_keys=True), "meta": json.dumps(qp.meta, sort_keys=True)}
    if qp.codes:        # absent when empty: files without codes stay as they were
        header["codes"] = json.dumps({k: list(np.shape(c)) for k, c in qp.codes.items()}, sort_keys=True)
    return atomic_write_bytes(path, save(tensors, metadata=header))


def load_qparams(path: str | os.PathLike, expect_model: str | None = None) -> QParams:
    """Read and validate a QParams file; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read QParams file ({e.strerror})") from None
    return qparams_from_bytes(raw, expect_model, name=str(path))


def qparams_from_bytes(raw: bytes, expect_model: str | None = None, name: str = "QParams") -> QParams:
    """``load_qparams`` of bytes already in memory (a release's payload); errors start with ``name``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = name
    try:
        tensors = load(raw)
        header = safetensors_metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a QParams file (corrupt or truncated safetensors: {e})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {header.get('format')!r}, expected {FORMAT!r}")
    model = header.get("model", "")
    if expect_model is not None and model != expect_model:
        raise ValueError(f"{path}: QParams are for model {model!r}, this model is {expect_model!r}")
    try:
        specs = json.loads(header["specs"])
        meta = json.loads(header.get("meta", "{}"))
        version = int(header["version"])
        code_shapes = json.loads(header.get("codes", "{}"))
        points = {}
        for key, spec in specs.items():
            spec = QuantSpec.model_validate(spec)
            scale, zp = tensors.pop(f"{key}/scale"), tensors.pop(f"{key}/zero_point")
            if spec.granularity == "per_tensor" and scale.size == 1 and zp.size == 1:
                scale, zp = scale.reshape(()), zp.reshape(())  # safetensors stores scalars as [1]
            points[key] = PointParams(spec, scale, zp)
    except KeyError as e:
        raise ValueError(f"{path}: missing entry {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: invalid header: {e}") from None
    smoothing = {k.removeprefix("smoothing/"): v for k, v in tensors.items() if k.startswith("smoothing/")}
    importance = {k.removeprefix("importance/"): v for k, v in tensors.items() if k.startswith("importance/")}
    extra = [k for k in tensors if not k.startswith(("smoothing/", "importance/", "codes/"))]
    if extra:
        raise ValueError(f"{path}: arrays without a spec: {extra[:3]}")
    codes = {}
    for k in (k for k in tensors if k.startswith("codes/")):
        key = k.removeprefix("codes/")
        if key not in points or key not in code_shapes:
            raise ValueError(f"{path}: codes {key} without a point or a shape in the header")
        try:
            codes[key] = unpack_codes(tensors[k], tuple(code_shapes[key]), points[key].spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: codes {key}: {e}") from None
    qp = QParams(points, model, version, smoothing, meta, importance, codes)
    try:
        qp.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return qp


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's bytes (ValueError when the header is
    cut); QParams files and server checkpoints keep their JSON there."""
    if len(raw) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError("header length exceeds the file")
    return json.loads(raw[8:8 + n]).get("__metadata__", {}) or {}


def diff_qparams(a: QParams, b: QParams) -> list[dict]:
    """What changed from ``a`` to ``b``, one row per point that differs.

    For each point: ``status`` (added, removed, spec, changed), the largest relative change of the
    scale and the largest absolute change of the zero-point.
    """
    rows = []
    for key in sorted(set(a.points) | set(b.points)):
        pa, pb = a.points.get(key), b.points.get(key)
        if pa is None or pb is None:
            rows.append({"key": key, "status": "added" if pa is None else "removed"})
        elif pa.spec != pb.spec or pa.scale.shape != pb.scale.shape:
            rows.append({"key": key, "status": "spec", "from": pa.spec.short(), "to": pb.spec.short()})
        else:
            rel = float(np.max(np.abs(pb.scale.astype(np.float64) / pa.scale - 1.0), initial=0.0))
            dz = int(np.max(np.abs(pb.zero_point.astype(np.int64) - pa.zero_point), initial=0))
            if rel > 0 or dz > 0:
                rows.append({"key": key, "status": "changed", "scale_rel_change": rel,
                             "zero_point_change": dz})
    for key in sorted(set(a.smoothing) | set(b.smoothing)):
        fa, fb = a.smoothing.get(key), b.smoothing.get(key)
        if fa is None or fb is None or fa.shape != fb.shape or not np.array_equal(fa, fb):
            rows.append({"key": f"smoothing/{key}", "status": "changed"})
    for key in sorted(set(a.importance) | set(b.importance)):
        ha, hb = a.importance.get(key), b.importance.get(key)
        if ha is None or hb is None or ha.shape != hb.shape or not np.array_equal(ha, hb):
            rows.append({"key": f"importance/{key}", "status": "changed"})
    for key in sorted(set(a.codes) | set(b.codes)):
        ca, cb = a.codes.get(key), b.codes.get(key)
        if ca is None or cb is None or ca.shape != cb.shape or not np.array_equal(ca, cb):
            rows.append({"key": f"codes/{key}", "status": "changed"})
    return rows


def pack_codes(codes: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Codes as stored: 4-bit ones two to a byte (``code - qmin``, the even column in the low
    nibble, an odd last column padded with 0), wider ones in the spec's container dtype."""
    c = np.asarray(codes)
    if spec.bits != 4:
        return np.ascontiguousarray(c.astype(spec.numpy_dtype))
    u = (c.astype(np.int16) - spec.qmin).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_codes(stored: np.ndarray, shape: tuple[int, ...], spec: QuantSpec) -> np.ndarray:
    """Inverse of ``pack_codes`` for codes of ``shape`` (out, in); ValueError when they do not fit."""
    stored = np.asarray(stored)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} is not (out, in)")
    if spec.bits != 4:
        if stored.shape != shape or stored.dtype != spec.numpy_dtype:
            raise ValueError(f"stored {stored.dtype} {stored.shape}, expected {spec.numpy_dtype} {shape}")
        return stored
    want = (shape[0], (shape[1] + 1) // 2)
    if stored.shape != want or stored.dtype != np.uint8:
        raise ValueError(f"stored {stored.dtype} {stored.shape}, expected uint8 {want} (two codes a byte)")
    u = np.empty((shape[0], want[1] * 2), np.uint8)
    u[:, 0::2], u[:, 1::2] = stored & 0x0F, stored >> 4
    return (u[:, :shape[1]].astype(np.int16) + spec.qmin).astype(spec.numpy_dtype)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so that ``path`` holds either its old content or all of the new one."""
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | os.PathLike, write) -> Path:
    """``atomic_write_bytes`` for content too large to hold as one bytes object: ``write(f)``
    streams it into the open temporary file (a seekable binary file) before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path

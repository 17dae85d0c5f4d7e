"""The wire format of jobs and replies: a few flat arrays plus one JSON header (design.md s. 6).

Flower pays about 130 bytes and tens of microseconds per ``Array``, so the many small per-point
arrays are packed into one flat array per dtype (integers keep their dtype) with an index
``[name, dtype, offset, shape]`` carried once, in the header. A payload is ``(flat, header)``:
``flat`` maps a dtype name to a 1-D array (an ``ArrayRecord``), ``header`` is a JSON-serialisable
dict (one string in a ``ConfigRecord``).

Replies carry no key names: their arrays are laid out column by column in the order of the
instruction's ``keys`` (sorted), which the server already knows, and they name the instruction they
answer by its round, parameter version and ``request`` digest. A statistics reply is therefore four
arrays and a header of a few hundred bytes, whatever the number of points.

Numpy and pydantic only: no Flower, and nothing here runs torch, so the same functions serve the
device, the server, secure aggregation and fuzzing. Decoders check everything against what the
server asked for and raise :class:`WireError` (a ValueError) with a stable ``code``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from quant.qparams import PointParams, QParams, pack_codes, unpack_codes
from quant.spec import QuantSpec
from quant.stats import ActivationStats, Grid

FORMAT = "fedquant.wire/1"
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
          "uint8", "uint16", "uint32", "uint64")
JOBS = ("scout", "stats", "lsq", "eval", "plan", "hessian")
MAX_BINS = 1 << 20          # bins per grid in an instruction: keeps count sums far from int64 overflow
MAX_HESSIAN_CHANNELS = 1 << 16  # channels of a second-moment point: its upper triangle is 2^31 numbers
MAX_COUNT = 1 << 40         # values per point per reply (a trillion): more is garbage, not data
_INT63 = 2**63 - 1

Flat = dict[str, np.ndarray]
Header = dict[str, Any]


class WireError(ValueError):
    """A payload that cannot be accepted; ``code`` is a short stable reason for metrics."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class Limits(BaseModel):
    """Bounds a decoder enforces before it allocates anything."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(64 << 20, gt=0, description="flat arrays, in bytes")
    max_header_bytes: int = Field(4 << 20, gt=0)
    max_entries: int = Field(100_000, gt=0, description="arrays in one index")
    max_ndim: int = Field(4, ge=0)
    max_name_chars: int = Field(512, gt=0)


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------
# Packing

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[Flat, list]:
    """One flat array per dtype, in the order of ``arrays``, and the index
    ``[[name, dtype, offset, shape], ...]`` (offsets in elements of that dtype's flat array)."""
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    index = []
    for name, a in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings, got {name!r}")
        a = np.asarray(a)
        dt = a.dtype.name
        if dt not in DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot go on the wire (allowed: {DTYPES})")
        off = sizes.get(dt, 0)
        index.append([name, dt, off, [int(d) for d in a.shape]])
        parts.setdefault(dt, []).append(a.reshape(-1))
        sizes[dt] = off + a.size
    flat = {dt: np.ascontiguousarray(np.concatenate(p), dtype=np.dtype(dt)) for dt, p in parts.items()}
    return flat, index


def unpack(flat: Mapping[str, np.ndarray], index, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack`, checking dtypes, bounds, overlaps, duplicates, coverage and size.
    Returns native-endian copies.

    Every entry is checked against the index alone before any element is copied: the entries of
    a flat array cover it exactly, so the copies add at most the flat arrays' own bytes, whatever
    the header claims (a 16 MiB reply whose 64 entries each named the whole array cost 1 GiB when
    each entry was copied before the overlap check)."""
    if not isinstance(flat, Mapping):
        raise WireError("malformed", f"flat arrays must be a mapping dtype -> array, got {type(flat).__name__}")
    total = 0
    for dt, arr in flat.items():
        if not isinstance(dt, str) or dt not in DTYPES:
            raise WireError("dtype", f"flat array {str(dt)[:40]!r}: not a wire dtype (allowed: {DTYPES})")
        if not isinstance(arr, np.ndarray):
            raise WireError("malformed", f"flat[{dt!r}] is a {type(arr).__name__}, not an array")
        if arr.dtype.name != dt:
            raise WireError("dtype", f"flat[{dt!r}] holds {arr.dtype}")
        if arr.ndim != 1:
            raise WireError("shape", f"flat[{dt!r}] has shape {arr.shape}, must be 1-D")
        total += arr.nbytes
    if total > limits.max_bytes:
        raise WireError("too_large", f"flat arrays hold {total} bytes, limit {limits.max_bytes}")
    if not isinstance(index, (list, tuple)):
        raise WireError("malformed", f"index must be a list, got {type(index).__name__}")
    if len(index) > limits.max_entries:
        raise WireError("too_large", f"index has {len(index)} entries, limit {limits.max_entries}")
    spans: dict[str, list[tuple[int, int, str]]] = {dt: [] for dt in flat}
    entries: dict[str, tuple[str, int, int, tuple[int, ...]]] = {}
    for i, e in enumerate(index):
        if not (isinstance(e, (list, tuple)) and len(e) == 4):
            raise WireError("malformed", f"index entry {i}: expected [name, dtype, offset, shape]")
        name, dt, off, shape = e
        if not (isinstance(name, str) and 0 < len(name) <= limits.max_name_chars):
            raise WireError("malformed", f"index entry {i}: name must be a string of 1 to "
                                         f"{limits.max_name_chars} characters")
        where = f"index entry {i} ({name!r})"
        if name in entries:
            raise WireError("malformed", f"{where}: duplicate name")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise WireError("dtype", f"{where}: dtype {str(dt)[:40]!r} is not a wire dtype")
        if dt not in flat:
            raise WireError("dtype", f"{where}: no flat array of dtype {dt}")
        if not _is_int(off) or off < 0:
            raise WireError("malformed", f"{where}: offset must be a non-negative integer")
        if not (isinstance(shape, (list, tuple)) and len(shape) <= limits.max_ndim
                and all(_is_int(d) and 0 <= d <= 2**32 for d in shape)):
            raise WireError("shape", f"{where}: shape must be a list of at most {limits.max_ndim} "
                                     f"non-negative integers")
        size = math.prod(int(d) for d in shape)
        if int(off) + size > flat[dt].size:
            raise WireError("shape", f"{where}: elements [{off}, {int(off) + size}) exceed "
                                     f"flat[{dt!r}] of {flat[dt].size}")
        spans[dt].append((int(off), int(off) + size, name))
        entries[name] = (dt, int(off), size, tuple(int(d) for d in shape))
    for dt, sp in spans.items():
        end, prev, covered = 0, None, 0
        for a, b, name in sorted(s for s in sp if s[1] > s[0]):
            if a < end:
                raise WireError("malformed", f"{name!r} overlaps {prev!r} in flat[{dt!r}]")
            end, prev, covered = b, name, covered + b - a
        if covered != flat[dt].size:
            raise WireError("shape", f"flat[{dt!r}] has {flat[dt].size} elements, the index covers {covered}")
    return {name: np.array(flat[dt][off:off + size], dtype=np.dtype(dt)).reshape(shape)
            for name, (dt, off, size, shape) in entries.items()}


def smallest_count_dtype(counts) -> np.dtype:
    """The smallest unsigned dtype holding every count exactly (design.md s. 6)."""
    c = np.asarray(counts)
    if c.size and c.dtype.kind not in "iu":
        raise ValueError(f"counts must be integers, got {c.dtype}")
    if c.size and c.min() < 0:
        raise ValueError("counts must be non-negative")
    top = int(c.max()) if c.size else 0
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"count {top} does not fit in uint64")


def payload_nbytes(flat: Mapping[str, np.ndarray], header: Header | str) -> int:
    """Bytes of a payload: the flat arrays plus the header as compact JSON (Flower adds about
    130 bytes per array on top)."""
    h = header if isinstance(header, str) else _dumps(header)
    return sum(a.nbytes for a in flat.values()) + len(h.encode())


def _dumps(header: Header) -> str:
    return json.dumps(header, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Headers

class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: StrictStr
    kind: StrictStr
    round: StrictInt = Field(ge=0, le=_INT63)
    version: StrictInt = Field(ge=0, le=_INT63)
    index: list


class _ReplyHeader(_Header):
    request: StrictStr = Field(max_length=64)


class _InstructionHeader(_Header):
    job: Literal["scout", "stats", "lsq", "eval", "plan", "hessian"]
    model: StrictStr = Field(max_length=256)
    meta: dict[StrictStr, StrictStr]
    specs: list[dict]
    points: list[tuple[StrictStr, StrictInt, list[StrictInt]]]
    smoothing: list[tuple[StrictStr, StrictInt]]
    importance: list[tuple[StrictStr, StrictInt]] = []
    codes: list[tuple[StrictStr, StrictInt, StrictInt]] = []
    keys: list[StrictStr]
    absmax: list[tuple[StrictStr, StrictInt]]
    sqsum: list[tuple[StrictStr, StrictInt]] = []
    hessian: list[tuple[StrictStr, StrictInt]] = []


def _load_header(header, model: type[_Header], kind: str, limits: Limits) -> _Header:
    try:
        if isinstance(header, (str, bytes)):
            if len(header) > limits.max_header_bytes:
                raise WireError("too_large", f"header has {len(header)} bytes, limit {limits.max_header_bytes}")
            header = json.loads(header)
        elif isinstance(header, Mapping) and len(_dumps(header)) > limits.max_header_bytes:
            raise WireError("too_large", f"header exceeds {limits.max_header_bytes} bytes")
    except (ValueError, TypeError, RecursionError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError("malformed", f"header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, Mapping):
        raise WireError("malformed", f"header must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise WireError("wrong_format", f"format {str(header.get('format'))[:40]!r}, expected {FORMAT!r}")
    if header.get("kind") != kind:
        raise WireError("wrong_kind", f"kind {str(header.get('kind'))[:40]!r}, expected {kind!r}")
    try:
        return model.model_validate(dict(header))
    except ValidationError as e:
        err = e.errors()[0]
        raise WireError("malformed", f"header field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _check_answers(h: _ReplyHeader, ins: "Instruction") -> None:
    if h.round != ins.round:
        raise WireError("stale_round", f"reply answers round {h.round}, this is round {ins.round}")
    if h.version != ins.version:
        raise WireError("wrong_version", f"reply answers parameter version {h.version}, sent {ins.version}")
    if h.request != ins.digest:
        raise WireError("wrong_request", "reply answers another instruction (request digest differs)")


def _reply_header(kind: str, ins: "Instruction", index: list) -> Header:
    return {"format": FORMAT, "kind": kind, "round": ins.round, "version": ins.version,
            "request": ins.digest, "index": index}


def _fields(flat, header, ins: "Instruction", kind: str, expect: dict[str, tuple[str, tuple]],
            limits: Limits) -> dict[str, np.ndarray]:
    """Decode a reply's header and arrays and check them against ``expect``:
    name -> (dtype or "int" for any integer dtype, shape)."""
    cap = _reply_header_cap(expect)
    if isinstance(header, (str, bytes)) and len(header) > cap:
        raise WireError("too_large", f"header has {len(header)} bytes, a {kind} reply's is at most {cap}")
    h = _load_header(header, _ReplyHeader, kind, limits)
    _check_answers(h, ins)
    arrays = unpack(flat, h.index, limits)
    _expect_exactly(arrays, expect, f"{kind} reply")
    return arrays


def _reply_header_cap(expect: Mapping[str, Any]) -> int:
    """Most bytes an honest reply header takes: the fixed fields and one index entry per expected
    array, generously spaced. Checked before the JSON is parsed, so a reply cannot make the server
    build more Python objects than its expected arrays need (a parsed index entry costs about ten
    times its JSON bytes)."""
    return 1024 + sum(len(json.dumps(name)) + 256 for name in expect)


def _key_at(keys, flat_i: int, sizes) -> str:
    return keys[int(np.searchsorted(np.cumsum(sizes), flat_i, side="right"))]


# ---------------------------------------------------------------------------------------------
# Server -> client

@dataclass(frozen=True, eq=False)
class Instruction:
    """What the server asks of a client in one round: the job, the global QParams of its profile
    (their ``version`` is the parameter version replies must answer), the points the job covers
    (``keys``, sorted: replies are laid out in this order), the histogram grids of a statistics
    round and the points whose per-channel abs-max is wanted, with their channel counts; a
    scouting round's ``sqsum`` too: the points whose per-channel sum of squares is wanted (the
    importance of a Linear's weight columns, ``quant.weight_ranges``); a Hessian round's ``hessian``:
    the points whose second moment ``sum_t x_t x_t^T`` is wanted, with their channel counts (GPTQ's
    ``H``, ``quant.gptq``; they are the round's keys)."""

    round: int
    job: Literal["scout", "stats", "lsq", "eval", "plan", "hessian"]
    qparams: QParams
    keys: tuple[str, ...] = ()
    grids: Mapping[str, Grid] = field(default_factory=dict)
    absmax: Mapping[str, int] = field(default_factory=dict)
    sqsum: Mapping[str, int] = field(default_factory=dict)
    hessian: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}")
        if not (_is_int(self.round) and 0 <= self.round <= _INT63):
            raise ValueError(f"round must be a non-negative integer, got {self.round!r}")
        keys = tuple(sorted(self.keys or self.grids))
        if len(set(keys)) != len(keys):
            raise ValueError("keys must be unique")
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "grids", dict(sorted(self.grids.items())))
        object.__setattr__(self, "absmax", {k: int(c) for k, c in sorted(self.absmax.items())})
        object.__setattr__(self, "sqsum", {k: int(c) for k, c in sorted(self.sqsum.items())})
        object.__setattr__(self, "hessian", {k: int(c) for k, c in sorted(self.hessian.items())})
        if self.job == "stats" and set(self.grids) != set(keys):
            raise ValueError("a statistics instruction needs one grid per key")
        if self.job != "stats" and self.grids:
            raise ValueError("grids belong to statistics instructions")
        if self.job not in ("scout", "stats") and self.absmax:
            raise ValueError("absmax belongs to scouting and statistics instructions")
        for g in self.grids.values():
            if g.bins > MAX_BINS:
                raise ValueError(f"grid has {g.bins} bins, at most {MAX_BINS}")
        if not set(self.absmax) <= set(keys) or any(c < 1 for c in self.absmax.values()):
            raise ValueError("absmax keys must be among the keys, with at least one channel")
        if self.job != "scout" and self.sqsum:
            raise ValueError("sqsum belongs to scouting instructions")
        if not set(self.sqsum) <= set(keys) or any(c < 1 for c in self.sqsum.values()):
            raise ValueError("sqsum keys must be among the keys, with at least one channel")
        if (self.job == "hessian") != bool(self.hessian) or set(self.hessian) != (set(keys) if self.hessian else set()):
            raise ValueError("a Hessian instruction (and only one) names the points of its second moments, its keys")
        if any(c < 1 or c > MAX_HESSIAN_CHANNELS for c in self.hessian.values()):
            raise ValueError(f"Hessian points need 1 to {MAX_HESSIAN_CHANNELS} channels")
        if self.job == "plan" and not keys:
            raise ValueError("a plan instruction names the points to measure")
        if self.job == "lsq" and not set(keys) <= set(self.qparams.points):
            raise ValueError(f"learned points without QParams: {sorted(set(keys) - set(self.qparams.points))[:3]}")

    @property
    def version(self) -> int:
        return int(self.qparams.version)

    @cached_property
    def _grid_table(self) -> dict[str, np.ndarray]:
        """The grids of ``keys`` as arrays, for checking every point of a statistics reply at
        once: bins, offset of each point's counts, lo, hi, width and start (``lo = start *
        width``), the latter two as Grid computes them."""
        g = [self.grids[k] for k in self.keys]
        bins = np.array([x.bins for x in g], dtype=np.int64)
        return {"bins": bins, "starts": np.concatenate([[0], np.cumsum(bins)[:-1]]).astype(np.int64),
                "lo": np.array([x.lo for x in g], dtype=np.float64),
                "hi": np.array([x.hi for x in g], dtype=np.float64),
                "width": np.array([x.width for x in g], dtype=np.float64),
                "start": np.array([float(x.start) for x in g], dtype=np.float64)}

    @cached_property
    def _lsq_layout(self) -> tuple[list, list, np.ndarray]:
        """Shapes, sizes and offsets (K + 1) of the points of ``keys`` in an lsq reply."""
        shapes = [self.qparams.points[k].scale.shape for k in self.keys]
        sizes = [math.prod(sh) for sh in shapes]
        return shapes, sizes, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @cached_property
    def digest(self) -> str:
        """sha256 (16 hex digits) of the encoded instruction: a reply names what it answers."""
        return request_digest(*encode_instruction(self))


def request_digest(flat: Mapping[str, np.ndarray], header: Header) -> str:
    """Digest of an instruction payload, the same on the server and on the device."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for dt in sorted(flat):
        a = np.asarray(flat[dt])
        h.update(dt.encode())
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()[:16]


def encode_instruction(ins: Instruction) -> tuple[Flat, Header]:
    """QParams column by column in sorted key order: ``scale`` float32, ``zero_point/<dtype>`` in
    each spec's storage dtype, ``smoothing`` float32; specs as JSON (each distinct spec once, the
    header's ``points`` rows are ``[key, spec id, shape]``); for statistics rounds the grids as
    float64 ``grids/lo_hi`` (K, 2) and int64 ``grids/bins`` (K,); GPTQ's codes (``QParams.codes``)
    as ``codes/<dtype>``, each weight's stored form (``quant.qparams.pack_codes``) in sorted key order."""
    qp = ins.qparams
    table: list[dict] = []
    seen: dict[str, int] = {}
    points, scales, zps = [], [], {}
    for key in sorted(qp.points):
        p = qp.points[key]
        s = json.dumps(p.spec.model_dump(mode="json"), sort_keys=True)
        if s not in seen:
            seen[s] = len(table)
            table.append(json.loads(s))
        points.append([key, seen[s], [int(d) for d in p.scale.shape]])
        scales.append(np.asarray(p.scale, dtype=np.float32).reshape(-1))
        zps.setdefault(p.spec.numpy_dtype.name, []).append(
            np.asarray(p.zero_point, dtype=p.spec.numpy_dtype).reshape(-1))
    arrays = {"scale": np.concatenate(scales) if scales else np.zeros(0, np.float32)}
    arrays |= {f"zero_point/{dt}": np.concatenate(z) for dt, z in sorted(zps.items())}
    smoothing = [[k, int(np.asarray(qp.smoothing[k]).size)] for k in sorted(qp.smoothing)]
    if smoothing:
        arrays["smoothing"] = np.concatenate(
            [np.asarray(qp.smoothing[k], dtype=np.float32).reshape(-1) for k, _ in smoothing])
    importance = [[k, int(np.asarray(qp.importance[k]).size)] for k in sorted(qp.importance)]
    if importance:
        arrays["importance"] = np.concatenate(
            [np.asarray(qp.importance[k], dtype=np.float32).reshape(-1) for k, _ in importance])
    codes = [[k, *(int(d) for d in np.shape(qp.codes[k]))] for k in sorted(qp.codes)]
    if codes:               # GPTQ's integer weights (QParams.codes), 4-bit ones two to a byte
        packed = {}
        for k, *_ in codes:
            c = pack_codes(qp.codes[k], qp.points[k].spec)
            packed.setdefault(c.dtype.name, []).append(c.reshape(-1))
        arrays |= {f"codes/{dt}": np.concatenate(v) for dt, v in sorted(packed.items())}
    if ins.job == "stats":      # even with no grids (no point seen yet): the decoder expects them
        g = list(ins.grids.values())
        arrays["grids/lo_hi"] = np.array([[x.lo, x.hi] for x in g], dtype=np.float64).reshape(-1, 2)
        arrays["grids/bins"] = np.array([x.bins for x in g], dtype=np.int64)
    flat, index = pack(arrays)
    header = {"format": FORMAT, "kind": "instruction", "round": ins.round, "version": ins.version,
              "job": ins.job, "model": qp.model, "meta": dict(qp.meta), "specs": table,
              "points": points, "smoothing": smoothing, "keys": list(ins.keys),
              "absmax": [[k, c] for k, c in ins.absmax.items()], "index": index}
    if importance:          # absent when empty: a run without it sends the headers it sent before
        header["importance"] = importance
    if codes:
        header["codes"] = codes
    if ins.sqsum:
        header["sqsum"] = [[k, c] for k, c in ins.sqsum.items()]
    if ins.hessian:
        header["hessian"] = [[k, c] for k, c in ins.hessian.items()]
    return flat, header


def decode_instruction(flat, header, limits: Limits = DEFAULT_LIMITS) -> Instruction:
    """Inverse of :func:`encode_instruction`; every array is checked against its spec."""
    h = _load_header(header, _InstructionHeader, "instruction", limits)
    arrays = unpack(flat, h.index, limits)
    try:
        specs = [QuantSpec.model_validate(s) for s in h.specs]
    except ValidationError as e:
        raise WireError("malformed", f"spec table: {e.errors()[0]['msg']}") from None
    sizes, zp_sizes = [], {}
    for key, i, shape in h.points:
        if not 0 <= i < len(specs):
            raise WireError("malformed", f"{key}: spec id {i} outside the table of {len(specs)}")
        if len(shape) > limits.max_ndim or not all(0 <= d <= 2**32 for d in shape):
            raise WireError("shape", f"{key}: bad parameter shape {shape}")
        sizes.append(math.prod(shape))
        dt = specs[i].numpy_dtype.name
        zp_sizes[dt] = zp_sizes.get(dt, 0) + sizes[-1]
    expect: dict[str, tuple[str, tuple]] = {"scale": ("float32", (sum(sizes),))}
    expect |= {f"zero_point/{dt}": (dt, (n,)) for dt, n in zp_sizes.items()}
    if any(c < 1 or c > 2**32 for _, c in h.smoothing):
        raise WireError("shape", "smoothing vectors need at least one channel")
    if h.smoothing:
        expect["smoothing"] = ("float32", (sum(c for _, c in h.smoothing),))
    if any(c < 1 or c > 2**32 for _, c in h.importance):
        raise WireError("shape", "importance vectors need at least one channel")
    if h.importance:
        expect["importance"] = ("float32", (sum(c for _, c in h.importance),))
    spec_of = {key: specs[i] for key, i, _ in h.points}
    code_sizes: dict[str, int] = {}
    for key, rows, cols in h.codes:
        if key not in spec_of or not (1 <= rows <= 2**32 and 1 <= cols <= 2**32):
            raise WireError("shape", f"codes {key}: not a point of the instruction, or a bad shape ({rows}, {cols})")
        dt = "uint8" if spec_of[key].bits == 4 else spec_of[key].numpy_dtype.name
        code_sizes[dt] = code_sizes.get(dt, 0) + rows * ((cols + 1) // 2 if spec_of[key].bits == 4 else cols)
    expect |= {f"codes/{dt}": (dt, (n,)) for dt, n in code_sizes.items()}
    k = len(h.keys)
    if h.job == "stats":
        expect["grids/lo_hi"], expect["grids/bins"] = ("float64", (k, 2)), ("int64", (k,))
    _expect_exactly(arrays, expect, "instruction")
    points, pos, zpos = {}, 0, dict.fromkeys(zp_sizes, 0)
    for (key, i, shape), size in zip(h.points, sizes):
        dt = specs[i].numpy_dtype.name
        s = arrays["scale"][pos:pos + size].reshape(shape)
        z = arrays[f"zero_point/{dt}"][zpos[dt]:zpos[dt] + size].reshape(shape)
        pos, zpos[dt] = pos + size, zpos[dt] + size
        try:
            points[key] = PointParams(specs[i], s, z)
            points[key].validate(key)
        except ValueError as e:
            code = ("zero_point_range" if "zero_point" in str(e) else
                    "scale_range" if "finite and positive" in str(e) else "shape")
            raise WireError(code, str(e)) from None
    smoothing, pos = {}, 0
    for key, c in h.smoothing:
        smoothing[key], pos = arrays["smoothing"][pos:pos + c], pos + c
    importance, pos = {}, 0
    for key, c in h.importance:
        importance[key], pos = arrays["importance"][pos:pos + c], pos + c
    codes, cpos = {}, dict.fromkeys(code_sizes, 0)
    for key, rows, cols in h.codes:
        spec = points[key].spec
        dt, n = ("uint8", rows * ((cols + 1) // 2)) if spec.bits == 4 else (spec.numpy_dtype.name, rows * cols)
        stored = arrays[f"codes/{dt}"][cpos[dt]:cpos[dt] + n].reshape(rows, -1)
        cpos[dt] += n
        try:
            codes[key] = unpack_codes(stored, (rows, cols), spec)
        except ValueError as e:
            raise WireError("malformed", f"codes {key}: {e}") from None
    if len(points) != len(h.points) or len(smoothing) != len(h.smoothing) or len(importance) != len(h.importance) \
            or len(codes) != len(h.codes):
        raise WireError("malformed", "duplicate point, smoothing, importance or codes keys")
    qp = QParams(points, h.model, h.version, smoothing, h.meta, importance, codes)
    try:
        qp.validate()
        grids = {}
        if h.job == "stats":
            lo_hi, bins = arrays["grids/lo_hi"], arrays["grids/bins"]
            grids = {key: Grid(lo_hi[j, 0], lo_hi[j, 1], int(bins[j])) for j, key in enumerate(h.keys)}
        return Instruction(h.round, h.job, qp, tuple(h.keys), grids, dict(h.absmax), dict(h.sqsum), dict(h.hessian))
    except ValueError as e:
        raise WireError("malformed", str(e)) from None


def _expect_exactly(arrays, expect: dict[str, tuple[str, tuple | None]], what: str) -> None:
    """``arrays`` has exactly the names of ``expect``: name -> (dtype, or "int" for any integer
    dtype; shape, or None for any)."""
    missing, unknown = sorted(set(expect) - set(arrays)), sorted(set(arrays) - set(expect))
    if missing:
        raise WireError("missing_key", f"{what} lacks {missing[:3]}")
    if unknown:
        raise WireError("unknown_key", f"{what} has unexpected {[u[:80] for u in unknown[:3]]}")
    for name, (dt, shape) in expect.items():
        a = arrays[name]
        if (a.dtype.kind not in "iu") if dt == "int" else (a.dtype.name != dt):
            raise WireError("dtype", f"{name}: dtype {a.dtype}, expected {dt}")
        if shape is not None and a.shape != shape:
            raise WireError("shape", f"{name}: shape {a.shape}, expected {shape}")


# ---------------------------------------------------------------------------------------------
# Scouting reply: min, max and n per point

@dataclass(frozen=True, eq=False)
class ScoutReply:
    """Observed ``(min, max)`` and number of values per point (design.md s. 4, scouting round), and
    the per-channel abs-max of the points the server asked for (SmoothQuant's statistic), and the
    per-channel sum of squares of those it asked ``sqsum`` for (float64; the tokens are ``n`` over
    the channel count)."""

    ranges: Mapping[str, tuple[float, float]]
    n: Mapping[str, int]
    channel_absmax: Mapping[str, np.ndarray] = field(default_factory=dict)
    channel_sqsum: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def absmax(self) -> dict[str, float]:
        """``max |x|`` of the points that saw values (exactly max(-min, max): not sent)."""
        return {k: max(-lo, hi) for k, (lo, hi) in self.ranges.items() if self.n[k] > 0}


def encode_scout_reply(reply: ScoutReply, ins: Instruction) -> tuple[Flat, Header]:
    """``min_max`` float64 (K, 2) and ``n`` int64 (K,) in the order of ``ins.keys``, and
    ``absmax/<key>`` float32 per point of ``ins.absmax``, ``sqsum/<key>`` float64 per point of
    ``ins.sqsum``."""
    _same_keys(reply.ranges, ins.keys, "scout reply")
    _same_keys(reply.n, ins.keys, "scout reply")
    _same_keys(reply.channel_absmax, ins.absmax, "scout reply abs-max")
    _same_keys(reply.channel_sqsum, ins.sqsum, "scout reply sum of squares")
    arrays = {"min_max": np.array([reply.ranges[k] for k in ins.keys], dtype=np.float64).reshape(-1, 2),
              "n": np.array([reply.n[k] for k in ins.keys], dtype=np.int64)}
    for k, c in ins.absmax.items():
        arrays[f"absmax/{k}"] = np.asarray(reply.channel_absmax[k], dtype=np.float32).reshape(c)
    for k, c in ins.sqsum.items():
        arrays[f"sqsum/{k}"] = np.asarray(reply.channel_sqsum[k], dtype=np.float64).reshape(c)
    flat, index = pack(arrays)
    return flat, _reply_header("scout", ins, index)


def decode_scout_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> ScoutReply:
    k = len(ins.keys)
    expect = {"min_max": ("float64", (k, 2)), "n": ("int64", (k,))}
    expect |= {f"absmax/{key}": ("float32", (c,)) for key, c in ins.absmax.items()}
    expect |= {f"sqsum/{key}": ("float64", (c,)) for key, c in ins.sqsum.items()}
    a = _fields(flat, header, ins, "scout", expect, limits)
    mm, n = a["min_max"], a["n"]
    if np.isnan(mm).any():
        raise WireError("nan", f"{ins.keys[int(np.argwhere(np.isnan(mm))[0, 0])]}: min/max is NaN")
    _check_n(n, ins.keys)
    empty = n == 0
    ok = np.where(empty, (mm[:, 0] == np.inf) & (mm[:, 1] == -np.inf), mm[:, 0] <= mm[:, 1])
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        raise WireError("inconsistent", f"{ins.keys[j]}: min {mm[j, 0]}, max {mm[j, 1]} with n = {n[j]}")
    counts = {key: int(n[j]) for j, key in enumerate(ins.keys)}
    ranges = {key: (float(mm[j, 0]), float(mm[j, 1])) for j, key in enumerate(ins.keys)}
    return ScoutReply(ranges, counts, _channel_absmax(a, ins), _channel_sqsum(a, ins, counts, ranges))


def _channel_sqsum(a: Mapping[str, np.ndarray], ins: Instruction, n: Mapping[str, int],
                   ranges: Mapping[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """The sums of squares, each within what the point's own count and range allow: ``tokens *
    max(|min|, |max|)^2`` per channel (a reply cannot claim more energy than it reports seeing)."""
    out = {}
    for key, c in ins.sqsum.items():
        v = a[f"sqsum/{key}"]
        if not np.all(np.isfinite(v)):
            raise WireError("nan", f"sqsum/{key}: non-finite values")
        if np.any(v < 0):
            raise WireError("sqsum_range", f"sqsum/{key}: negative values")
        lo, hi = ranges[key]
        bound = (n[key] / c) * max(abs(lo), abs(hi)) ** 2 if n[key] else 0.0
        if np.any(v > bound * (1 + 1e-9) + 1e-300):
            raise WireError("sqsum_range", f"sqsum/{key}: more than {n[key] // c} tokens within "
                                           f"[{lo:.4g}, {hi:.4g}] can sum to")
        out[key] = v
    return out


def _channel_absmax(a: Mapping[str, np.ndarray], ins: Instruction) -> dict[str, np.ndarray]:
    out = {}
    for key in ins.absmax:
        v = a[f"absmax/{key}"]
        if not np.all(np.isfinite(v)):
            raise WireError("nan", f"absmax/{key}: non-finite values")
        if np.any(v < 0):
            raise WireError("absmax_range", f"absmax/{key}: negative values")
        out[key] = v
    return out


def _check_n(n: np.ndarray, keys) -> None:
    if np.any(n < 0):
        raise WireError("negative_count", f"{keys[int(np.flatnonzero(n < 0)[0])]}: n < 0")
    if np.any(n > MAX_COUNT):
        raise WireError("count_mismatch", f"{keys[int(np.flatnonzero(n > MAX_COUNT)[0])]}: n > {MAX_COUNT}")


def _same_keys(d: Mapping, keys, what: str) -> None:
    if set(d) != set(keys):
        raise ValueError(f"{what}: keys differ from the instruction's: missing "
                         f"{sorted(set(keys) - set(d))[:3]}, unexpected {sorted(set(d) - set(keys))[:3]}")


# ---------------------------------------------------------------------------------------------
# Statistics reply: an ActivationStats per point, and per-channel abs-max for some

@dataclass(frozen=True, eq=False)
class StatsReply:
    """Histogram statistics per point on the server's grids, and per-channel abs-max (SmoothQuant)
    for the points the server asked for."""

    stats: Mapping[str, ActivationStats]
    absmax: Mapping[str, np.ndarray] = field(default_factory=dict)


def encode_stats_reply(reply: StatsReply, ins: Instruction, count_dtype=None) -> tuple[Flat, Header]:
    """``counts`` (sum of bins,) in the smallest exact unsigned dtype (or ``count_dtype``: secure
    aggregation needs one fixed dtype), ``below_above`` int64 (K, 2), ``n`` int64 (K,),
    ``min_max`` float64 (K, 2), and ``absmax/<key>`` float32 per requested point."""
    _same_keys(reply.stats, ins.keys, "stats reply")
    _same_keys(reply.absmax, ins.absmax, "stats reply abs-max")
    st = [reply.stats[k] for k in ins.keys]
    for k, s in zip(ins.keys, st):
        if s.grid != ins.grids[k]:
            raise ValueError(f"{k}: statistics on grid {s.grid}, the instruction sent {ins.grids[k]}")
    counts = np.concatenate([s.counts for s in st]) if st else np.zeros(0, dtype=np.int64)
    dt = np.dtype(count_dtype) if count_dtype is not None else smallest_count_dtype(counts)
    if counts.size and int(counts.max()) > np.iinfo(dt).max:
        raise ValueError(f"counts up to {int(counts.max())} do not fit {dt}")
    arrays = {"counts": counts.astype(dt),
              "below_above": np.array([[s.below, s.above] for s in st], dtype=np.int64).reshape(-1, 2),
              "n": np.array([s.n for s in st], dtype=np.int64),
              "min_max": np.array([[s.min, s.max] for s in st], dtype=np.float64).reshape(-1, 2)}
    for k, c in ins.absmax.items():
        arrays[f"absmax/{k}"] = np.asarray(reply.absmax[k], dtype=np.float32).reshape(c)
    flat, index = pack(arrays)
    return flat, _reply_header("stats", ins, index)


def decode_stats_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> StatsReply:
    """Refuses counts that do not fit the grids sent, negative counts, counts that do not add up
    to n, NaN min/max and statistics inconsistent with their histogram."""
    keys = ins.keys
    k, bins = len(keys), [ins.grids[key].bins for key in keys]
    expect = {"counts": ("int", (sum(bins),)), "below_above": ("int64", (k, 2)), "n": ("int64", (k,)),
              "min_max": ("float64", (k, 2))}
    expect |= {f"absmax/{key}": ("float32", (c,)) for key, c in ins.absmax.items()}
    a = _fields(flat, header, ins, "stats", expect, limits)
    counts, ba, n, mm = a["counts"], a["below_above"], a["n"], a["min_max"]
    if counts.dtype.kind == "i" and np.any(counts < 0):
        raise WireError("negative_count", f"{_key_at(keys, int(np.flatnonzero(counts < 0)[0]), bins)}: negative bin count")
    if np.any(ba < 0):
        raise WireError("negative_count", f"{keys[int(np.argwhere(ba < 0)[0, 0])]}: negative below/above")
    _check_n(n, keys)
    rep = np.repeat(n, bins)
    if np.any(counts > rep) or np.any(ba > n[:, None]):   # each term <= n <= 2^40: sums fit int64
        raise WireError("count_mismatch", "a count exceeds the number of values n")
    starts = np.concatenate([[0], np.cumsum(bins)[:-1]]).astype(np.int64)
    c64 = counts.astype(np.int64)
    sums = np.add.reduceat(c64, starts) if counts.size else np.zeros(k, dtype=np.int64)
    sums = sums + ba.sum(axis=1)
    if np.any(sums != n):
        j = int(np.flatnonzero(sums != n)[0])
        raise WireError("count_mismatch", f"{keys[j]}: counts sum to {int(sums[j])} but n is {int(n[j])}")
    if np.isnan(mm).any():
        raise WireError("nan", f"{keys[int(np.argwhere(np.isnan(mm))[0, 0])]}: min/max is NaN")
    stats = {}
    if k and _inconsistent(c64, ba, n, mm, ins._grid_table).any():
        for j, key in enumerate(keys):      # the first inconsistent point, with from_arrays' words
            g = ins.grids[key]
            try:
                ActivationStats.from_arrays({
                    "lo_hi": np.array([g.lo, g.hi]), "counts": counts[starts[j]:starts[j] + bins[j]],
                    "below_above": ba[j], "min_max": mm[j], "n": n[j]})
            except ValueError as e:
                raise WireError("inconsistent", f"{key}: {e}") from None
    # Everything ActivationStats.from_arrays checks per point holds for every point (above), so
    # the points are built without checks, their counts read-only views of one int64 copy.
    c64.setflags(write=False)
    ends = (starts + bins).tolist()
    for key, s0, s1, (below, above), (mn, mx), nj in zip(keys, starts.tolist(), ends, ba.tolist(),
                                                          mm.tolist(), n.tolist()):
        stats[key] = ActivationStats.unchecked(ins.grids[key], c64[s0:s1], below, above, mn, mx, nj)
    absmax = _channel_absmax(a, ins)
    return StatsReply(stats, absmax)


def _inconsistent(c64: np.ndarray, ba: np.ndarray, n: np.ndarray, mm: np.ndarray, t: dict) -> np.ndarray:
    """Per point, whether ``ActivationStats.from_arrays`` refuses its min/max (the checks it makes
    beyond those decode_stats_reply has made for all points: n = 0 with a range, min > max,
    min/max outside the grid with nothing below/above it, min/max beyond the occupied bins), for
    all points at once. The edges are computed as ``Grid.edges`` computes them."""
    mn, mx, below, above, lo, hi = mm[:, 0], mm[:, 1], ba[:, 0], ba[:, 1], t["lo"], t["hi"]
    bad = (n == 0) & ~((mn == math.inf) & (mx == -math.inf))
    bad |= (n > 0) & ~(mn <= mx)
    bad |= ((mn < lo) & (below == 0)) | ((mx >= hi) & (above == 0))
    total = c64.size
    idx = np.arange(total, dtype=np.int64)
    nz = c64 != 0
    first = np.minimum.reduceat(np.where(nz, idx, total), t["starts"])
    last = np.maximum.reduceat(np.where(nz, idx, -1), t["starts"])
    has = first < total
    first_edge = (t["start"] + (np.where(has, first - t["starts"], 0) + 1).astype(np.float64)) * t["width"]
    last_edge = (t["start"] + np.where(has, last - t["starts"], 0).astype(np.float64)) * t["width"]
    bad |= (has & ~(mn < first_edge)) | ((below != 0) & ~(mn < hi))
    bad |= (has & ~(mx >= last_edge)) | ((above != 0) & ~(mx >= lo))
    return bad


# ---------------------------------------------------------------------------------------------
# Statistics as one vector of [0, 1] numbers: what secure aggregation sums (docs/privacy.md)

def secure_stats_length(ins: "Instruction") -> int:
    """Length of a statistics reply as a secure-aggregation vector: per point its cells
    ``[below, bins..., above]``, then one ``n`` per point."""
    return sum(ins.grids[k].bins + 2 for k in ins.keys) + len(ins.keys)


def stats_to_secure_vector(reply: StatsReply, ins: "Instruction", cap: int) -> np.ndarray:
    """A statistics reply as float64 numbers in [0, 1]: each point's cells and ``n`` divided by
    ``cap``, the most values one client may count at a point. SecAgg+ sums clients' vectors in
    fixed point within a clipping range, so each must be bounded; a point where the client saw more
    than ``cap`` values is scaled down to ``cap`` (its shape kept), which also bounds what one
    client weighs in the sum, as the robust rules do. Min/max and abs-max are not sent: a maximum
    does not go through a sum."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if ins.absmax:
        raise ValueError("a secure statistics round cannot carry per-channel abs-max (a max is not a sum)")
    _same_keys(reply.stats, ins.keys, "stats reply")
    parts, ns = [], []
    for k in ins.keys:
        s = reply.stats[k]
        if s.grid != ins.grids[k]:
            raise ValueError(f"{k}: statistics on grid {s.grid}, the instruction sent {ins.grids[k]}")
        cells = np.concatenate([[s.below], s.counts, [s.above]]).astype(np.float64)
        scale = 1.0 / max(cap, s.n)
        parts.append(cells * scale)
        ns.append(s.n * scale)
    return np.concatenate([*parts, np.asarray(ns, dtype=np.float64)]) if parts else np.zeros(0)


def secure_vector_to_stats(total: np.ndarray, ins: "Instruction", cap: int, clients: int,
                           tolerance: float) -> dict[str, ActivationStats]:
    """The statistics of a secure sum of ``clients``' :func:`stats_to_secure_vector` vectors
    (``total``: the sum, still divided by ``cap``): counts rounded to integers (fixed-point noise
    makes them fractional and may make an empty cell slightly negative), ``n`` their total, and
    min/max where the occupied cells put them (the lower edge of the first occupied bin, the upper
    edge of the last one, just outside the grid when mass lies outside it), since no client sent
    its own. ``tolerance``: how far the fixed point may move a number. Raises ValueError for a sum
    no honest clients give: the wrong length, not finite, a number outside [0, clients], or a
    point whose cells do not add up to its ``n`` (a client that sent garbage under its mask)."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (secure_stats_length(ins),):
        raise ValueError(f"secure statistics: {total.shape[0] if total.ndim == 1 else total.shape} numbers, "
                         f"the instruction's points need {secure_stats_length(ins)}")
    if not np.isfinite(total).all():
        raise ValueError("secure statistics: the sum is not finite")
    if total.size and not (total.min() >= -tolerance and total.max() <= clients + tolerance):
        raise ValueError(f"secure statistics: numbers in [{total.min():.6g}, {total.max():.6g}], "
                         f"{clients} clients give [0, {clients}]")
    ns = total[len(total) - len(ins.keys):]
    out, at = {}, 0
    for k, n_sent in zip(ins.keys, ns):
        g = ins.grids[k]
        part = total[at:at + g.bins + 2]
        if abs(part.sum() - n_sent) > (g.bins + 3) * tolerance:
            raise ValueError(f"secure statistics: {k}: the cells add up to {part.sum() * cap:.6g} values, "
                             f"n says {n_sent * cap:.6g}")
        cells = np.maximum(np.rint(part * cap), 0).astype(np.int64)
        at += g.bins + 2
        below, counts, above = int(cells[0]), cells[1:-1], int(cells[-1])
        n = int(cells.sum())
        if n == 0:
            out[k] = ActivationStats(g, counts)
            continue
        edges, occupied = g.edges(), np.flatnonzero(counts)
        below_lo = math.nextafter(g.lo, -math.inf)
        if below:
            mn = below_lo
        else:
            mn = float(edges[occupied[0]]) if occupied.size else g.hi
        if above:
            mx = g.hi
        else:
            mx = float(np.nextafter(edges[occupied[-1] + 1], -np.inf)) if occupied.size else below_lo
        out[k] = ActivationStats(g, counts, below, above, mn, mx, n)
    return out


# ---------------------------------------------------------------------------------------------
# Learned-range reply: deltas of (log s, beta) and the local loss

@dataclass(frozen=True, eq=False)
class LsqReply:
    """``local - global`` of ``(log s, beta)`` per point (float32, the shape of the point's scale),
    and the local loss before and after the local steps (design.md s. 4, LSQ / LSQ+)."""

    delta_log_s: Mapping[str, np.ndarray]
    delta_beta: Mapping[str, np.ndarray]
    loss_before: float
    loss_after: float


def encode_lsq_reply(reply: LsqReply, ins: Instruction) -> tuple[Flat, Header]:
    """``delta_log_s`` and ``delta_beta`` float32, concatenated in the order of ``ins.keys``, and
    ``loss`` float32 (2,): before, after."""
    _same_keys(reply.delta_log_s, ins.keys, "lsq reply")
    _same_keys(reply.delta_beta, ins.keys, "lsq reply")
    shapes = [ins.qparams.points[k].scale.shape for k in ins.keys]

    def cat(d):
        parts = []
        for k, shape in zip(ins.keys, shapes):
            v = np.asarray(d[k], dtype=np.float32)
            if v.shape != shape:
                raise ValueError(f"{k}: delta has shape {v.shape}, the scale has {shape}")
            parts.append(v.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    flat, index = pack({"delta_log_s": cat(reply.delta_log_s), "delta_beta": cat(reply.delta_beta),
                        "loss": np.array([reply.loss_before, reply.loss_after], dtype=np.float32)})
    return flat, _reply_header("lsq", ins, index)


def decode_lsq_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> LsqReply:
    return lsq_reply_from_arrays(decode_lsq_arrays(flat, header, ins, limits), ins)


def decode_lsq_arrays(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """The checked flat arrays of an lsq reply (finite deltas and loss, in ``ins.keys`` order):
    what server.validate checks further, all points at once, before :func:`lsq_reply_from_arrays`."""
    _, sizes, starts = ins._lsq_layout
    p = int(starts[-1])
    a = _fields(flat, header, ins, "lsq", {"delta_log_s": ("float32", (p,)), "delta_beta": ("float32", (p,)),
                                           "loss": ("float32", (2,))}, limits)
    for name in ("delta_log_s", "delta_beta", "loss"):
        bad = ~np.isfinite(a[name])
        if bad.any():
            where = "loss" if name == "loss" else _key_at(ins.keys, int(np.flatnonzero(bad)[0]), sizes)
            raise WireError("nan", f"{name} of {where}: NaN or infinite")
    return a


def lsq_reply_from_arrays(a: Mapping[str, np.ndarray], ins: Instruction) -> LsqReply:
    """The reply of :func:`decode_lsq_arrays`' flat arrays: split into one delta per key of
    ``ins`` (views, no copy). Public so that server.validate can check the flat arrays first."""
    shapes, _, starts = ins._lsq_layout
    bounds = list(zip(ins.keys, starts[:-1].tolist(), starts[1:].tolist(), shapes))

    def split(v):
        return {k: v[s0:s1].reshape(shape) for k, s0, s1, shape in bounds}

    return LsqReply(split(a["delta_log_s"]), split(a["delta_beta"]), float(a["loss"][0]), float(a["loss"][1]))


# ---------------------------------------------------------------------------------------------
# Differentially private statistics rounds (quant.dp): one clipped vector instead of histograms

def dp_length(ins: Instruction) -> int:
    """Numbers in a DP statistics reply: (log2 width ratio, shift of zero's place) for each of ``ins.keys``
    (quant.dp)."""
    return 2 * len(ins.keys)


def encode_dp_reply(vector: np.ndarray, ins: Instruction) -> tuple[Flat, Header]:
    """``dp`` float64 ``(2 K,)``: the client's ``quant.dp.client_vector`` over ``ins.keys``."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (dp_length(ins),):
        raise ValueError(f"dp vector has shape {v.shape}, the instruction's {len(ins.keys)} keys need "
                         f"({dp_length(ins)},)")
    flat, index = pack({"dp": v})
    return flat, _reply_header("dp", ins, index)


def decode_dp_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """The vector of a DP statistics reply: shape for the instruction's keys, finite."""
    a = _fields(flat, header, ins, "dp", {"dp": ("float64", (dp_length(ins),))}, limits)
    v = a["dp"]
    bad = ~np.isfinite(v)
    if bad.any():
        raise WireError("nan", f"dp of {ins.keys[int(np.flatnonzero(bad)[0]) // 2]}: NaN or infinite")
    return v


# ---------------------------------------------------------------------------------------------
# Plan replies (the mixed-precision plan's sensitivity, quant.mixed): additive sums per point

@dataclass(frozen=True, eq=False)
class PlanReply:
    """Per point of the instruction's keys, the client's FIT sum ``sum (g * delta)^2`` over its
    tokens (activations) or sequences (weights), and how many tokens and sequences it summed."""

    sens: Mapping[str, float]
    tokens: int
    sequences: int


def encode_plan_reply(reply: PlanReply, ins: Instruction) -> tuple[Flat, Header]:
    """``sens`` float64 (K,) in the order of ``ins.keys``; ``counts`` int64 (2,): tokens, sequences."""
    _same_keys(reply.sens, ins.keys, "plan reply")
    flat, index = pack({"sens": np.array([reply.sens[k] for k in ins.keys], dtype=np.float64),
                        "counts": np.array([reply.tokens, reply.sequences], dtype=np.int64)})
    return flat, _reply_header("plan", ins, index)


def decode_plan_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> PlanReply:
    """A plan reply: one finite, non-negative sum per key (``nan``, ``negative``), positive counts."""
    a = _fields(flat, header, ins, "plan", {"sens": ("float64", (len(ins.keys),)), "counts": ("int64", (2,))},
                limits)
    v = a["sens"]
    bad = ~np.isfinite(v)
    if bad.any():
        raise WireError("nan", f"sens of {ins.keys[int(np.flatnonzero(bad)[0])]}: NaN or infinite")
    if (v < 0).any():
        raise WireError("negative", f"sens of {ins.keys[int(np.flatnonzero(v < 0)[0])]}: negative")
    tokens, seqs = (int(x) for x in a["counts"])
    if tokens < 1 or seqs < 1 or tokens > MAX_COUNT:
        raise WireError("count_mismatch", f"counts {tokens} tokens, {seqs} sequences: not positive and in bounds")
    return PlanReply(dict(zip(ins.keys, v.tolist())), tokens, seqs)


# ---------------------------------------------------------------------------------------------
# Hessian replies (GPTQ's second moments, quant.gptq): additive sums per point

@dataclass(frozen=True, eq=False)
class HessianReply:
    """Per point of the instruction's ``hessian``, the client's ``sum_t x_t x_t^T`` (float64, (c, c))
    over its ``tokens`` tokens of the float input (unsmoothed, unrotated)."""

    sums: Mapping[str, np.ndarray]
    tokens: int


def triangle_size(c: int) -> int:
    """Numbers in the upper triangle (diagonal included) of a ``c`` x ``c`` matrix."""
    return c * (c + 1) // 2


def encode_hessian_reply(reply: HessianReply, ins: Instruction) -> tuple[Flat, Header]:
    """``sums`` float32: each point's upper triangle (row by row, ``np.triu_indices``) in the order
    of ``ins.keys``; ``tokens`` int64 (1,)."""
    _same_keys(reply.sums, ins.keys, "Hessian reply")
    parts = []
    for k in ins.keys:
        h = np.asarray(reply.sums[k])
        c = ins.hessian[k]
        if h.shape != (c, c):
            raise ValueError(f"{k}: the server expects a ({c}, {c}) second moment, got {h.shape}")
        parts.append(h[np.triu_indices(c)].astype(np.float32))
    flat, index = pack({"sums": np.concatenate(parts), "tokens": np.array([reply.tokens], dtype=np.int64)})
    return flat, _reply_header("hessian", ins, index)


def decode_hessian_reply(flat, header, ins: Instruction, limits: Limits = DEFAULT_LIMITS) -> HessianReply:
    """A Hessian reply: per point a finite (``nan``) second moment whose diagonal is not negative
    (``negative``) and whose entries keep Cauchy-Schwarz's bound ``|H_ij| <= sqrt(H_ii H_jj)``
    (``inconsistent``: no sum of ``x x^T`` breaks it); a positive token count. Symmetric float64."""
    sizes = [triangle_size(ins.hessian[k]) for k in ins.keys]
    a = _fields(flat, header, ins, "hessian", {"sums": ("float32", (sum(sizes),)), "tokens": ("int64", (1,))},
                limits)
    tokens = int(a["tokens"][0])
    if tokens < 1 or tokens > MAX_COUNT:
        raise WireError("count_mismatch", f"{tokens} tokens: not positive and in bounds")
    v, pos, sums = a["sums"], 0, {}
    for k, n in zip(ins.keys, sizes):
        c = ins.hessian[k]
        tri = v[pos:pos + n].astype(np.float64)
        pos += n
        if not np.all(np.isfinite(tri)):
            raise WireError("nan", f"second moment of {k}: NaN or infinite")
        h = np.zeros((c, c))
        h[np.triu_indices(c)] = tri
        d = np.diag(h).copy()
        if (d < 0).any():
            raise WireError("negative", f"second moment of {k}: a negative diagonal")
        h = h + np.triu(h, 1).T
        bound = np.sqrt(np.outer(d, d)) * (1 + 1e-3) + 1e-30     # float32 rounding of honest sums
        if (np.abs(h) > bound).any():
            raise WireError("inconsistent", f"second moment of {k}: an entry exceeds sqrt(H_ii H_jj)")
        sums[k] = h
    return HessianReply(sums, tokens)

"""A hostile fleet (issue 14, goal 1): the server never dies and never commits garbage.

Generated replies, malformed and well formed but extreme (infinities, 1e308, subnormals, mass at
the grid's edges, counts at their limits, inflated example counts, every field at its bound), go
through the server's whole path round after round: validation (``server.validate``), aggregation
and the commit (``server.rounds.apply_round``), the checkpoint written and read back. Nothing
raises; every QParams the server commits passes the device's own check
(``quant.qparams.qparams_problems``) and its next instruction decodes as a device decodes it; a
round whose result would not pass is skipped with a reason. Decoding a reply costs at most about
twice its bytes, whatever its header says.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from quant.affine import range_to_qparams, tensor_range
from quant.qparams import PointParams, QParams, qparams_problems
from quant.spec import activation_spec, weight_spec
from quant.stats import ActivationStats, observe
from quant.wire import (DTYPES, HessianReply, Instruction, LsqReply, ScoutReply, StatsReply, decode_instruction,
                        encode_hessian_reply, encode_instruction, encode_lsq_reply, encode_scout_reply,
                        encode_stats_reply, pack, unpack)
from server.config import ServerConfig
from server.rounds import Accepted, apply_round, commit_problems, gptq_paths, instructions_for
from server.state import initial_state, load_checkpoint, save_checkpoint, states_equal
from server.validate import (Rejection, ValidationConfig, validate_eval_metrics, validate_hessian_reply,
                             validate_lsq_reply, validate_scout_reply, validate_stats_reply)

KEYS = ("blk.q:input", "blk.o:input", "blk.attn:other")
PROFILES = {"u8": activation_spec(8), "u4": activation_spec(4), "s16": activation_spec(16)}
CHANNELS = 8
# the Linear weights' specs per profile: 8-bit per channel, except u4's 4-bit ones (per group of 4
# inputs, signed; per channel, unsigned), which a hessian round's GPTQ (``gptq.<profile>.bits = 4``)
# rounds; an 8-bit GPTQ profile rounds the others
WEIGHT_SPECS = {"u4": {"blk.q": weight_spec(4, group_size=4), "blk.o": weight_spec(4, symmetric=False)}}
WEIGHTS = {p: (np.random.default_rng(i).normal(size=(4, CHANNELS)) * 0.1).astype(np.float32)
           for i, p in enumerate(("blk.q", "blk.o"))}
LN8 = math.log(8)
# Finite and infinite magnitudes an attacker picks: around the validation bound (2^60), float32's
# and float64's largest, subnormals, zeros.
HUGE = [1e3, 1e10, 2.0**60, np.nextafter(2.0**60, np.inf), 3.4e38, 1e100, 1.7e308, np.finfo(np.float64).max,
        np.inf]
TINY = [0.0, -0.0, 5e-324, 1e-310, 1.4e-45, 2.0**-24, 2.0**-40]
EXAMPLES_OK = [1, 12, 10**6, np.int64(12)]
EXAMPLES_BAD = [0, -1, 10**6 + 1, 2**63, True, 1.5, None, "12", math.inf, math.nan]


def initial() -> dict[str, QParams]:
    out = {}
    for name, spec in PROFILES.items():
        z = spec.symmetric_zero_point if spec.symmetric else (spec.qmax + 1) // 2
        pts = {k: PointParams(spec, np.float32(0.05), np.array(z, dtype=spec.numpy_dtype)) for k in KEYS}
        for path, w in WEIGHTS.items():
            ws = WEIGHT_SPECS.get(name, {}).get(path, weight_spec(8))
            pts[f"{path}:weight"] = PointParams(ws, *range_to_qparams(*tensor_range(w, ws), ws))
        out[name] = QParams(pts, "fp-hostile", 0)
    return out


INITIAL = initial()


def pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


# ---------------------------------------------------------------------------------------------
# Replies: honest, extreme, malformed

def client_values(rng, key: str) -> np.ndarray:
    scale = float(rng.uniform(0.2, 3.0))
    x = rng.standard_t(4, size=(12, CHANNELS)) * scale
    return (np.abs(x) if key.endswith(":other") else x).astype(np.float32)


def extreme_range(rng) -> tuple[float, float]:
    """A (min, max) pair with at least one extreme: huge, infinite, tiny, NaN, or reversed."""
    a, b = -float(pick(rng, HUGE + TINY)), float(pick(rng, HUGE + TINY))
    r = rng.random()
    if r < 0.1:
        return b, a                         # min > max
    if r < 0.15:
        return math.nan, b
    if r < 0.3:
        return -1.0, b
    if r < 0.45:
        return a, 2.0
    return a, b


def scout_reply(rng, ins: Instruction, hostile: bool) -> ScoutReply:
    data = {k: client_values(rng, k) for k in ins.keys}
    ranges = {k: (float(x.min()), float(x.max())) for k, x in data.items()}
    n = {k: int(x.size) for k, x in data.items()}
    absmax = {k: np.abs(data[k]).max(axis=0)[:c] for k, c in ins.absmax.items()}
    if hostile:
        for k in ins.keys:
            if rng.random() < 0.5:
                ranges[k] = extreme_range(rng)
            if rng.random() < 0.15:
                n[k] = int(pick(rng, [0, 1, 2**40, 2**40 + 1, 2**62, -1]))
                if n[k] == 0 and rng.random() < 0.5:
                    ranges[k] = (math.inf, -math.inf)
        for k, c in ins.absmax.items():
            if rng.random() < 0.5:
                v = np.array(absmax[k], np.float64)
                v[rng.integers(c, size=int(rng.integers(1, c + 1)))] = pick(rng, HUGE + TINY + [math.nan, -1.0])
                with np.errstate(over="ignore"):
                    absmax[k] = v.astype(np.float32)
    return ScoutReply(ranges, n, absmax)


def extreme_stats(rng, grid, honest: ActivationStats) -> ActivationStats:
    """Statistics on ``grid`` with their mass and extremes at the limits, mostly self-consistent
    (so that they pass the structural checks and reach the value checks and the aggregation)."""
    b, edges = grid.bins, grid.edges()
    kind = pick(rng, ["edges", "outside", "limits", "subnormal", "outside", "random"])
    counts = np.zeros(b, np.int64)
    if kind == "edges":                     # all mass in the first and the last bin
        counts[0], counts[-1] = rng.integers(1, 2**20, size=2)
        return ActivationStats(grid, counts, 0, 0, edges[0], float(np.nextafter(edges[-1], -np.inf)),
                               int(counts.sum()))
    if kind == "outside":                   # mass beyond the grid, extremes anywhere up to infinity
        below, above = (int(v) for v in rng.integers(0, 2**40, size=2))
        below, above = max(below, 1), max(above, 1)
        if rng.random() < 0.3:
            below = above = 2**39
        mn, mx = -float(pick(rng, HUGE)), float(pick(rng, HUGE))
        return ActivationStats(grid, honest.counts, below, above, min(mn, honest.min, grid.lo - 1),
                               max(mx, honest.max, grid.hi), honest.n + below + above)
    if kind == "limits":                    # n = 2^40 in one bin (or one more: refused)
        j = int(rng.integers(b))
        counts[j] = 2**40 + int(rng.random() < 0.2)
        return ActivationStats(grid, counts, 0, 0, edges[j], edges[j], int(counts[j]))
    if kind == "subnormal":                 # subnormal values in the bin that starts at 0
        j = int(np.flatnonzero(edges == 0.0)[0]) if np.any(edges[:-1] == 0.0) else 0
        counts[j] = 3
        return ActivationStats(grid, counts, 0, 0, max(5e-324, edges[j]), max(1e-310, edges[j]), 3)
    counts = rng.integers(0, 5, size=b)     # random: mostly inconsistent
    below, above = (int(v) for v in rng.integers(0, 3, size=2))
    mn, mx = extreme_range(rng)
    return ActivationStats(grid, counts, below, above, mn, mx, int(counts.sum()) + below + above
                           + int(rng.integers(-1, 2)))


def stats_reply(rng, ins: Instruction, hostile: bool) -> StatsReply:
    data = {k: client_values(rng, k) for k in ins.keys}
    stats = {k: observe(data[k], ins.grids[k]) for k in ins.keys}
    absmax = {k: np.abs(data[k]).max(axis=0)[:c] for k, c in ins.absmax.items()}
    if hostile:
        for k in ins.keys:
            if rng.random() < 0.6:
                stats[k] = extreme_stats(rng, ins.grids[k], stats[k])
        for k, c in ins.absmax.items():
            if rng.random() < 0.3:
                absmax[k] = np.full(c, pick(rng, [3.4e38, 2.0**61, 1e-45, 0.0]), np.float32)
    return StatsReply(stats, absmax)


def lsq_reply(rng, ins: Instruction, hostile: bool) -> LsqReply:
    d_ls, d_b = {}, {}
    for k in ins.keys:
        p = ins.qparams.points[k]
        shape = p.scale.shape
        ls = rng.normal(0, 0.05, size=shape)
        beta = np.zeros(shape) if p.spec.symmetric else rng.normal(0, 0.01, size=shape) * p.scale
        if hostile and rng.random() < 0.7:
            s0 = p.scale.astype(np.float64)
            r = rng.random()
            if r < 0.3:                     # the scale step at its bound, just inside or outside
                ls = np.full(shape, pick(rng, [LN8, -LN8, np.nextafter(LN8, 0), LN8 * (1 + 1e-6), 50.0, -50.0]))
            elif r < 0.5 and not p.spec.symmetric:  # the zero-point at the edge of the integer range
                z = pick(rng, [p.spec.qmin - 0.5, p.spec.qmax + 0.5, p.spec.qmin - 0.51, p.spec.qmax + 0.51])
                beta = -z * s0 + p.zero_point.astype(np.float64) * s0
                ls = np.zeros(shape)
            elif r < 0.7:                   # huge, infinite or subnormal deltas of beta
                beta = np.full(shape, pick(rng, [1e30, -3.4e38, 2.0**61, 1e-45, math.inf, -math.inf, math.nan]))
            else:
                ls = np.full(shape, pick(rng, [math.nan, math.inf, 1e-45, 3.4e38]))
        with np.errstate(over="ignore", invalid="ignore"):
            d_ls[k], d_b[k] = np.asarray(ls).astype(np.float32), np.asarray(beta).astype(np.float32)
    loss = (2.0, 1.9)
    if hostile and rng.random() < 0.2:
        loss = (pick(rng, [math.inf, math.nan, 3.4e38, -1.0]), 1.9)
    return LsqReply(d_ls, d_b, *loss)


def hessian_reply(rng, ins: Instruction, hostile: bool) -> HessianReply:
    """Honest: per key of ``ins.hessian``, the real ``sum_t x_t x_t^T`` of random activations with
    its channel count (sometimes 40 rows seen 25,000 times each: a million tokens). Hostile: one or
    two of NaN/inf entries, huge or tiny scales, a negative diagonal, an entry beyond Cauchy-Schwarz
    (the upper triangle chosen apart from the lower), an indefinite matrix that keeps every pairwise
    bound, a liar's one-direction moment claiming a huge token count, wrong channel counts, missing
    or extra keys, token counts from EXAMPLES_BAD, zero tokens."""
    rows = int(rng.integers(1, 41))
    rep = 25_000 if rng.random() < 0.1 else 1
    scale = float(rng.uniform(0.2, 3.0))
    sums = {}
    for k, c in ins.hessian.items():
        x = rng.standard_t(4, size=(rows, c)) * scale
        sums[k] = rep * (x.T @ x)
    tokens = rows * rep
    if not hostile:
        return HessianReply(sums, tokens)
    with np.errstate(all="ignore"):
        return hostile_hessian(rng, ins, sums, tokens, rows)


def hostile_hessian(rng, ins: Instruction, sums: dict, tokens: int, rows: int) -> HessianReply:
    """``hessian_reply``'s hostile part: one or two injuries to the honest ``sums`` and ``tokens``."""
    keys = list(ins.hessian)
    for _ in range(int(rng.integers(1, 3))):
        kind = pick(rng, ["nan", "huge", "tiny", "negative", "inconsistent", "indefinite", "liar", "channels",
                          "keys", "tokens", "zero"])
        k = pick(rng, keys) if keys else None
        h = np.array(sums[k], np.float64) if k in sums else None
        c = 0 if h is None else h.shape[0]
        i, j = (int(v) for v in rng.integers(max(c, 1), size=2))
        if kind == "nan" and c:
            h[i, j] = h[j, i] = pick(rng, [math.nan, math.inf, -math.inf])
        elif kind == "huge" and c:
            if rng.random() < 0.5:          # the whole moment scaled: mostly beyond float32 or 2^120 a token
                h = h * float(pick(rng, HUGE))
            else:                           # one diagonal entry (its row's bound only grows)
                h[i, i] = float(pick(rng, HUGE))
        elif kind == "tiny" and c:          # zeros, float32 subnormals, or gone in float32
            h = np.full((c, c), float(pick(rng, TINY))) if rng.random() < 0.3 else h * float(pick(rng, TINY))
            if rng.random() < 0.5:
                h[i, :] = h[:, i] = 0.0     # a channel never seen
        elif kind == "negative" and c:
            h[i, i] = -float(pick(rng, [1.0, h[i, i], 1e-30, 3.4e38]))
        elif kind == "inconsistent" and c:
            if rng.random() < 0.5 and i != j:
                h[i, j] = h[j, i] = 2 * math.sqrt(abs(h[i, i] * h[j, j])) + 1.0
            else:                           # asymmetric: the upper triangle travels, whatever the lower
                d = np.abs(np.diag(h))
                h = rng.normal(size=(c, c)) * float(pick(rng, [0.1, 1.0, 10.0])) * d.mean()
                np.fill_diagonal(h, d)
        elif kind == "indefinite" and c:    # every |H_ij| <= sqrt(H_ii H_jj), yet not a second moment
            corr = float(pick(rng, [0.99, 0.9, 1.0])) * rng.choice([-1.0, 1.0], size=(c, c))
            corr = np.triu(corr, 1) + np.triu(corr, 1).T + np.eye(c)
            d = np.sqrt(np.abs(np.diag(h))) + 1e-3
            h = corr * np.outer(d, d)
        elif kind == "liar":                # a moment of one direction, claiming a huge token count
            v = rng.normal(size=max(ins.hessian.values(), default=0))
            sums = {kk: float(pick(rng, [1e10, 1e20, 1e30])) * np.outer(v[:cc], v[:cc])
                    for kk, cc in ins.hessian.items()}
            tokens = int(pick(rng, [10**6, 2**40, 2**40 + 1]))
            continue
        elif kind == "channels" and c:      # the wrong channel count
            cc = int(pick(rng, [c - 1, c + 1, 2 * c, 1]))
            x = rng.normal(size=(rows, cc))
            h = x.T @ x
        elif kind == "keys":
            if keys and rng.random() < 0.5:
                sums.pop(pick(rng, keys), None)
            else:
                sums[pick(rng, ["blk.extra:input", "blk.attn:other", "blk.q:weight"])] = np.eye(CHANNELS)
            continue
        elif kind == "tokens":
            tokens = pick(rng, EXAMPLES_BAD)
            continue
        elif kind == "zero":
            tokens = 0
            if rng.random() < 0.5:
                sums = {kk: np.zeros_like(v) for kk, v in sums.items()}
            continue
        if h is not None:
            sums[k] = h
    return HessianReply(sums, tokens)


def encode_hessian(reply: HessianReply, ins: Instruction):
    """``encode_hessian_reply``; for what it refuses to write (other keys or channel counts, token
    counts an int64 cannot hold) the same layout by hand: the upper triangles in the instruction's
    key order (the extra keys after them), ``tokens`` as int64, uint64 or float64."""
    t = reply.tokens
    exact = isinstance(t, (int, np.integer)) and not isinstance(t, bool) and -2**63 <= int(t) < 2**63
    if exact:
        try:
            with np.errstate(all="ignore"):
                return encode_hessian_reply(reply, ins)
        except ValueError:
            pass
    keys = [k for k in ins.keys if k in reply.sums] + [k for k in reply.sums if k not in ins.keys]
    with np.errstate(all="ignore"):
        parts = [np.asarray(reply.sums[k], np.float64)[np.triu_indices(np.shape(reply.sums[k])[0])].astype(np.float32)
                 for k in keys]
    sums = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if exact:
        tokens = np.array([t], np.int64)
    elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**64:
        tokens = np.array([t], np.uint64)
    else:
        tokens = np.array([math.nan if t is None else float(t)], np.float64)
    flat, index = pack({"sums": sums, "tokens": tokens})
    empty = HessianReply({k: np.zeros((c, c)) for k, c in ins.hessian.items()}, 1)
    return flat, {**encode_hessian_reply(empty, ins)[1], "index": index}


def eval_metrics(rng, ins: Instruction, hostile: bool) -> dict:
    m = {"num-examples": 4, "tokens": 124, "nll_sum": float(rng.uniform(300, 500)), "version": ins.version}
    if hostile:
        m[pick(rng, list(m))] = pick(rng, [0, -1, 10**6, 10**12 + 1, 2**63, 1.7e308, 1e308, math.inf, math.nan,
                                           5e-324, True, None, "1", ins.version + 1])
        if rng.random() < 0.5:
            m["nll_sum"] = pick(rng, [1.7e308, 1e308, np.finfo(np.float64).max])
    return m


def mutate(rng, flat: dict, header: dict):
    """One to three random injuries to a payload: bytes, dtypes, sizes, index entries (offsets,
    shapes, overlaps, duplicates, thousands of entries), header fields, the header's text."""
    flat, header = dict(flat), json.loads(json.dumps(header))
    index, rnd, version = header["index"], header["round"], header["version"]
    for _ in range(int(rng.integers(1, 4))):
        what = pick(rng, ["bytes", "dtype", "size", "offset", "shape", "entry_dtype", "name", "overlap",
                          "duplicate", "entries", "field", "drop"])
        dt = pick(rng, sorted(flat)) if flat else "float32"
        e = index[int(rng.integers(len(index)))] if index else None
        if what == "bytes" and dt in flat and flat[dt].size:
            a = np.array(flat[dt])
            raw = a.view(np.uint8)
            raw[rng.integers(raw.size, size=min(4, raw.size))] = rng.integers(0, 256, size=min(4, raw.size))
            flat[dt] = a
        elif what == "dtype" and dt in flat:
            with np.errstate(all="ignore"):
                flat[dt] = flat[dt].astype(pick(rng, [d for d in DTYPES if d != dt]))
        elif what == "size" and dt in flat:
            flat[dt] = flat[dt][:-1] if rng.random() < 0.5 else np.concatenate([flat[dt], flat[dt][:1]])
        elif what == "offset" and e:
            e[2] = pick(rng, [-1, 1, 2**62, 2**70, 1.5, "0", True, None])
        elif what == "shape" and e:
            e[3] = pick(rng, [[-1], [2**33], [1, 1, 1, 1, 1], "x", [2**32, 2**32], [0], [1], []])
        elif what == "entry_dtype" and e:
            e[1] = pick(rng, [d for d in DTYPES if d != e[1]] + ["bool", "complex64", 3])
        elif what == "name" and e:
            e[0] = pick(rng, ["", "x" * 600, 7, index[0][0], "absmax/nope", "counts", "sums", "tokens"])
        elif what == "overlap":
            for x in index:
                x[2] = 0
        elif what == "duplicate" and e:
            index.append(list(e))
        elif what == "entries":
            index.extend([f"pad{i}", dt, 0, [0]] for i in range(int(pick(rng, [10, 1000, 5000]))))
        elif what == "field":
            header[pick(rng, ["round", "version", "request", "format", "kind", "index", "extra"])] = pick(
                rng, [rnd + 1, version + 1, "0" * 16, "fedquant.wire/2", "lsq", "hessian", None,
                      -1, 2**64, [], {}])
        elif what == "drop" and flat:
            del flat[dt]
    r = rng.random()
    if r < 0.2:
        text = json.dumps(header)
        header = pick(rng, [text[:len(text) // 2], text + " " * 5000, text.encode(), "null", "[]", text])
    elif r < 0.25:
        flat = pick(rng, [None, [], {"float32": "x"}, {"junk": np.zeros(3)}])
    return flat, header


# ---------------------------------------------------------------------------------------------
# One run of the schedule, every reply generated

# what follows the learned-range rounds in a run with GPTQ: hessian rounds (each asks for its part of
# the inputs of the Linears GPTQ rounds, here blk.q and blk.o) and eval rounds between or after them
GPTQ_TAILS = [
    [{"job": "hessian", "repeat": 2}, {"job": "eval"}],
    [{"job": "hessian"}, {"job": "eval"}],                          # one round asks for both inputs
    [{"job": "hessian"}, {"job": "eval"}, {"job": "hessian"}, {"job": "eval"}],
    [{"job": "hessian", "repeat": 3, "min_replies": 3}],            # a round whose part is empty
]


def gptq_config(rng) -> dict:
    """u4's 4-bit weights (per group and per channel), sometimes an 8-bit profile's too, sometimes a
    profile with no weight of the configured width; damping from none (singular moments fail) up."""
    out = {"u4": {"damp": float(pick(rng, [0.01, 0.01, 0.0, 1.0]))}}
    for prof in ("u8", "s16"):
        if rng.random() < 0.3:
            out[prof] = {"bits": int(pick(rng, [8, 8, 4])), "damp": float(pick(rng, [0.01, 0.0]))}
    return out


def config(rng, slow: bool = False, p_gptq: float = 0.5) -> ServerConfig:
    methods = ["minmax", "percentile", "mse"] + ["entropy"] * slow     # entropy is the slow one
    gptq = rng.random() < p_gptq
    return ServerConfig(
        schedule=[{"job": "scout"}, {"job": "stats", "repeat": 3}, {"job": "lsq", "repeat": 2},
                  *(pick(rng, GPTQ_TAILS) if gptq else [{"job": "eval"}])],
        gptq=gptq_config(rng) if gptq else {},
        bins=int(pick(rng, [8, 16, 32])), grid_quantile=float(pick(rng, [0.5, 0.9, 1.0])),
        widen_threshold=float(pick(rng, [0.0, 1e-3, 0.5])),
        calibrator={"method": pick(rng, methods), "mse_steps": 8},
        profile_calibrators={p: {"method": pick(rng, methods), "mse_steps": 8} for p in PROFILES if rng.random() < 0.5},
        smoothing={"alpha": 0.5} if rng.random() < 0.5 else None,
        stats_rule=pick(rng, ["sum", "trimmed"]), absmax_rule=pick(rng, ["max", "clipped"]),
        absmax_clip=float(pick(rng, [1.0, 4.0])), trim=float(pick(rng, [0.0, 0.1, 0.25, 0.45])),
        lsq_rule=pick(rng, ["mean", "median", "trimmed"]), server_opt=pick(rng, ["fedavg", "fedadam"]),
        server_lr=float(pick(rng, [1.0, 1.0, 0.1, 4.0])), learn={"which": pick(rng, ["activations", "all"])},
        validation=ValidationConfig(max_scale=float(pick(rng, [1e6, 1e6, 1e30]))))


def reply_for(rng, ins: Instruction, hostile: bool, malformed: bool, tally: Counter):
    """One generated reply to ``ins``: its validator's call, and the example count it claims."""
    if ins.job == "eval":
        m = eval_metrics(rng, ins, hostile)
        return (lambda config: validate_eval_metrics(m, ins, config)), m.get("num-examples")
    make, encode, validate = {"scout": (scout_reply, encode_scout_reply, validate_scout_reply),
                              "stats": (stats_reply, encode_stats_reply, validate_stats_reply),
                              "lsq": (lsq_reply, encode_lsq_reply, validate_lsq_reply),
                              "hessian": (hessian_reply, encode_hessian, validate_hessian_reply)}[ins.job]
    reply = make(rng, ins, hostile)
    with np.errstate(all="ignore"):
        flat, header = encode(reply, ins)
    if malformed:
        flat, header = mutate(rng, flat, header)
        tally["malformed_generated"] += 1
        tally[f"{ins.job}_malformed"] += 1
    elif rng.random() < 0.5:
        header = json.dumps(header)         # as it comes off the wire
    ok = EXAMPLES_OK
    if ins.job == "hessian" and not hostile:    # an honest client has a token or more per example
        ok = [e for e in EXAMPLES_OK if e <= reply.tokens]
    n = pick(rng, EXAMPLES_BAD) if hostile and rng.random() < 0.15 else pick(rng, ok)
    return (lambda config: validate(flat, header, ins, n, config)), n


def run_schedule(rng, tmp_path, tally: Counter, clients: int = 13, p_hostile: float = 0.5,
                 slow: bool = False) -> None:
    cfg = config(rng, slow)
    state = initial_state(INITIAL, "hostile")
    ckpt = tmp_path / "checkpoint.safetensors"
    profiles = sorted(PROFILES)
    for rnd, spec in cfg.rounds():
        inss = instructions_for(state, rnd, spec, cfg, WEIGHTS)
        for ins in inss.values():           # what every phone does first with the next instruction
            back = decode_instruction(*encode_instruction(ins))
            assert back.digest == ins.digest
        accepted = {p: [] for p in profiles}
        rejections = []
        for i in range(clients):
            prof = profiles[i % len(profiles)]
            if prof not in inss:            # sits the round out (a hessian round with nothing to ask)
                continue
            hostile = rng.random() < p_hostile
            malformed = hostile and rng.random() < 0.4
            validate, n = reply_for(rng, inss[prof], hostile, malformed, tally)
            try:
                r = validate(cfg.validation)
            except Exception as e:          # counted, then the test fails
                tally[f"exception:validate:{type(e).__name__}: {str(e)[:80]}"] += 1
                continue
            tally["generated"] += 1
            tally["hostile_generated"] += hostile
            if isinstance(r, Rejection):
                tally[f"rejected:{r.code}"] += 1
                tally[f"{spec.job}_rejected"] += 1
                tally[f"{spec.job}_rejected:{r.code}"] += 1
                if not hostile:
                    tally[f"honest_rejected:{spec.job}:{r.code}"] += 1
                assert not r.detail.startswith("unexpected"), r.detail
                rejections.append(r)
            else:
                tally["accepted_hostile" if hostile else "accepted_honest"] += 1
                tally[f"{spec.job}_accepted_{'hostile' if hostile else 'honest'}"] += 1
                accepted[prof].append(Accepted(f"c{i}", int(n), r))
        try:
            new, m = apply_round(state, rnd, spec, accepted, rejections, cfg, WEIGHTS)
            check_commit(state, new, m, tally, cfg)
            save_checkpoint(new, ckpt)
            assert states_equal(load_checkpoint(ckpt, expect_digest="hostile"), new)
        except Exception as e:
            tally[f"exception:round:{type(e).__name__}: {str(e)[:80]}"] += 1
            return
        tally["rounds"] += 1
        state = new


def check_commit(old, new, m: dict, tally: Counter, cfg: ServerConfig) -> None:
    """What a round may leave behind: an applied round whose QParams a device holding the old
    ones accepts, or a skipped one that changed nothing but the round counter; GPTQ's codes only
    for the weights of its profiles' configured width, each the shape of its weight and on its grid,
    new ones only from a hessian round, as many as it reports rounded."""
    assert new.round == m["round"]
    if m.get("skipped"):
        tally["rounds_skipped"] += 1
        assert m["applied"] is False and isinstance(m["skipped"], str)
        assert states_equal(replace(new, round=old.round), old)
        return
    tally["rounds_applied" if m.get("applied") else "rounds_unchanged"] += 1
    in_features = {p: w.shape[1] for p, w in WEIGHTS.items()}
    for prof, qp in new.qparams.items():
        assert qparams_problems(qp, old.qparams[prof], in_features) == [], prof
    assert commit_problems(old, new, WEIGHTS) == []
    paths = gptq_paths(new.qparams, cfg, WEIGHTS)
    for prof, qp in new.qparams.items():
        for key, c in qp.codes.items():
            path, spec = key.rsplit(":", 1)[0], qp.points[key].spec
            assert key.endswith(":weight") and path in paths.get(prof, []), (prof, key)
            assert c.shape == WEIGHTS[path].shape and c.dtype == spec.numpy_dtype, (prof, key, c.shape, c.dtype)
            assert spec.qmin <= c.min() and c.max() <= spec.qmax, (prof, key)
        fresh = [k for k, c in qp.codes.items() if old.qparams[prof].codes.get(k) is not c]
        if m["job"] == "hessian" and m.get("applied"):
            assert len(fresh) == m["gptq"].get(prof, {}).get("rounded", 0), (prof, fresh, m["gptq"])
            tally["codes_committed"] += len(fresh)
        else:
            assert not fresh, (m["job"], prof, fresh)
    if m["job"] == "hessian":
        tally["hessian_rounds_applied" if m.get("applied") else "hessian_rounds_not_applied"] += 1
        tally["gptq_failed"] += sum(len(d["failed"]) for d in m.get("gptq", {}).values())


def summary(tally: Counter) -> str:
    rej = {k.split(":", 1)[1]: v for k, v in sorted(tally.items()) if k.startswith("rejected:")}
    hess = {k.split(":", 1)[1]: v for k, v in sorted(tally.items()) if k.startswith("hessian_rejected:")}
    exc = {k: v for k, v in tally.items() if k.startswith("exception")}
    return (f"generated {tally['generated']} replies ({tally['hostile_generated']} hostile, "
            f"{tally['malformed_generated']} of them malformed); rejected {sum(rej.values())} by code {rej}; "
            f"accepted {tally['accepted_honest']} honest, {tally['accepted_hostile']} hostile; rounds "
            f"{tally['rounds']} (applied {tally['rounds_applied']}, skipped {tally['rounds_skipped']}, "
            f"unchanged {tally['rounds_unchanged']}); hessian replies accepted {tally['hessian_accepted_honest']} "
            f"honest, {tally['hessian_accepted_hostile']} hostile, rejected {tally['hessian_rejected']} by code "
            f"{hess} ({tally['hessian_malformed']} malformed); hessian rounds applied "
            f"{tally['hessian_rounds_applied']} ({tally['codes_committed']} codes committed, {tally['gptq_failed']} "
            f"GPTQ failures), not applied {tally['hessian_rounds_not_applied']}; "
            f"exceptions {sum(exc.values())} {exc}")


def fuzz(tmp_path, runs: int, seed: int, slow: bool = False) -> Counter:
    rng = np.random.default_rng(seed)
    tally = Counter()
    for _ in range(runs):
        run_schedule(rng, tmp_path, tally, slow=slow)
    print("\n" + summary(tally))
    assert not [k for k in tally if k.startswith("exception")], summary(tally)
    return tally


def test_generated_replies_never_raise_and_nothing_refusable_is_committed(tmp_path):
    """10,000 replies, half of them hostile (two in five of those malformed), through validation,
    aggregation and the commit of 110 runs of a 7-round schedule of 13 clients (scout with and
    without smoothing, stats, lsq, eval; random calibrators, rules, optimizers and bounds), half of
    them ending in hessian rounds with GPTQ (4-bit weights per group and per channel, sometimes
    8-bit ones; damping from none up) and eval rounds between or after them."""
    tally = fuzz(tmp_path, 110, seed=14)
    assert tally["generated"] >= 10_000
    assert tally["accepted_hostile"] > 500 and tally["rounds_applied"] > 500
    assert_hessian_coverage(tally)


def assert_hessian_coverage(tally: Counter) -> None:
    """Not vacuous: honest and hostile hessian replies accepted, hostile ones rejected, rounds that
    committed GPTQ's codes; and no honest hessian reply refused (float32's rounding of a real sum of
    ``x x^T`` keeps Cauchy-Schwarz's bound within the validation's slack)."""
    assert not [k for k in tally if k.startswith("honest_rejected:hessian:")], summary(tally)
    assert tally["hessian_accepted_honest"] > 100 and tally["hessian_accepted_hostile"] > 20, summary(tally)
    assert tally["hessian_rejected"] > 100 and tally["hessian_malformed"] > 50, summary(tally)
    assert tally["hessian_rounds_applied"] > 20, summary(tally)
    assert tally["codes_committed"] > 20, summary(tally)


@pytest.mark.slow
def test_many_more_generated_replies_with_every_calibrator(tmp_path):
    """Entropy calibration too (the slow one); 250 runs keep make test's share to about a minute."""
    tally = fuzz(tmp_path, 250, seed=15, slow=True)
    assert tally["generated"] >= 22_000
    assert_hessian_coverage(tally)


# ---------------------------------------------------------------------------------------------
# The holes the attacker found, one by one

def scout_ins(state, cfg):
    return instructions_for(state, 1, cfg.schedule[0], cfg, WEIGHTS)


@pytest.mark.parametrize("extreme,code", [(1e100, "value_range"), (1.7e308, "value_range"),
                                          (np.finfo(np.float64).max, "value_range"), (math.inf, "nan"),
                                          (2.0**60 * 1.01, "value_range")])
def test_extreme_but_finite_extremes_are_rejected_everywhere(extreme, code):
    cfg = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}], bins=16, smoothing={"alpha": 0.5})
    state = initial_state(INITIAL, "d")
    ins = scout_ins(state, cfg)["u8"]
    rng = np.random.default_rng(0)
    good = scout_reply(rng, ins, False)
    ranges = {**good.ranges, KEYS[0]: (-extreme, 1.0)}
    r = validate_scout_reply(*encode_scout_reply(replace(good, ranges=ranges), ins), ins, 12)
    assert isinstance(r, Rejection) and r.code == code, r
    with np.errstate(over="ignore"):
        absmax = {k: np.full(c, extreme, np.float64).astype(np.float32) for k, c in ins.absmax.items()}
    r = validate_scout_reply(*encode_scout_reply(replace(good, channel_absmax=absmax), ins), ins, 12)
    assert isinstance(r, Rejection) and r.code in (code, "nan"), r
    # statistics: the extreme counted above the grid, consistent otherwise
    state, _ = apply_round(state, 1, cfg.schedule[0], {"u8": [Accepted("c", 12, good)]}, [], cfg, WEIGHTS)
    ins = instructions_for(state, 2, cfg.schedule[1], cfg, WEIGHTS)["u8"]
    st = stats_reply(rng, ins, False)
    s = st.stats[KEYS[1]]
    st.stats[KEYS[1]] = ActivationStats(s.grid, s.counts, s.below, s.above + 1, s.min, extreme, s.n + 1)
    r = validate_stats_reply(*encode_stats_reply(st, ins), ins, 12)
    assert isinstance(r, Rejection) and r.code == code, r
    # the largest accepted value goes through the round and the commit
    st.stats[KEYS[1]] = ActivationStats(s.grid, s.counts, s.below, s.above + 1, -(2.0**60), 2.0**60, s.n + 1)
    r = validate_stats_reply(*encode_stats_reply(st, ins), ins, 12)
    assert isinstance(r, StatsReply)
    new, m = apply_round(state, 2, cfg.schedule[1], {"u8": [Accepted("c", 12, r)]}, [], cfg, WEIGHTS)
    assert commit_problems(state, new, WEIGHTS) == []
    assert m["applied"] or m.get("skipped")


def test_a_round_that_raises_is_skipped_with_its_reason_and_changes_nothing():
    """The safety net behind validation: an accepted reply that makes the arithmetic raise (here
    an infinite max, which validation now refuses, handed to apply_round directly; under the exact
    rules: the robust ones clamp it to round_factor x the grid, and nothing raises)."""
    cfg = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}], bins=16, widen_threshold=0.0,
                       stats_rule="sum")
    state = initial_state(INITIAL, "d")
    rng = np.random.default_rng(1)
    ins = scout_ins(state, cfg)["u8"]
    state, _ = apply_round(state, 1, cfg.schedule[0], {"u8": [Accepted("c", 12, scout_reply(rng, ins, False))]},
                           [], cfg)
    ins = instructions_for(state, 2, cfg.schedule[1], cfg)["u8"]
    st = stats_reply(rng, ins, False)
    s = st.stats[KEYS[0]]
    st.stats[KEYS[0]] = ActivationStats(s.grid, s.counts, s.below, s.above + 1, s.min, math.inf, s.n + 1)
    new, m = apply_round(state, 2, cfg.schedule[1], {"u8": [Accepted("c", 12, st)]}, [], cfg)
    assert m["applied"] is False and "ValueError" in m["skipped"]
    assert new.round == 2 and states_equal(replace(new, round=1), state)


def test_a_round_whose_result_a_device_would_refuse_is_skipped():
    """Learned ranges stepped past what a device loads (a scale above 2^64: valid replies under a
    lax max_scale and a large server learning rate) are not committed; the next round goes on."""
    big = {p: qp.with_points({k: PointParams(qp.points[k].spec, np.float32(2.0**63),
                                             np.array(qp.points[k].spec.symmetric_zero_point if
                                                      qp.points[k].spec.symmetric else 0,
                                                      dtype=qp.points[k].spec.numpy_dtype))
                              for k in KEYS}) for p, qp in INITIAL.items()}
    cfg = ServerConfig(schedule=[{"job": "lsq", "repeat": 2}], server_lr=3.0,
                       validation=ValidationConfig(max_scale=1e30))
    state = initial_state(big, "d")
    ins = instructions_for(state, 1, cfg.schedule[0], cfg)["u8"]
    reply = LsqReply({k: np.float32(2.0) for k in KEYS}, {k: np.float32(0.0) for k in KEYS}, 2.0, 1.9)
    r = validate_lsq_reply(*encode_lsq_reply(reply, ins), ins, 12, cfg.validation)
    assert isinstance(r, LsqReply)
    new, m = apply_round(state, 1, cfg.schedule[0], {"u8": [Accepted("c", 12, r)]}, [], cfg)
    assert m["applied"] is False and "outside [2^-24, 2^64]" in m["skipped"], m
    assert states_equal(replace(new, round=0), state) and m["versions"]["u8"] == 0
    new, m = apply_round(new, 2, cfg.schedule[0], {}, [], cfg)       # the run goes on
    assert new.round == 2


def test_the_device_and_the_server_apply_the_same_check():
    qp = INITIAL["u8"]
    k = KEYS[0]
    spec = qp.points[k].spec
    assert qparams_problems(qp) == [] and qparams_problems(qp, qp, {"blk.q": CHANNELS}) == []
    for s in (np.float32(1e-30), np.float32(3e38), np.float32(2.0**65)):
        bad = qp.with_points({k: PointParams(spec, s, qp.points[k].zero_point)}, version=1)
        assert any("outside [2^-24, 2^64]" in e for e in qparams_problems(bad, qp))
    bad = QParams(dict(qp.points), qp.model, 1, {"blk.q": np.full(CHANNELS, 1e-50)})
    assert any("factors outside" in e for e in qparams_problems(bad, qp))
    bad = QParams(dict(qp.points), qp.model, 1, {"blk.q": np.ones(CHANNELS - 1, np.float32)})
    assert any("factors for 8 inputs" in e for e in qparams_problems(bad, qp, {"blk.q": CHANNELS}))
    assert any("older" in e for e in qparams_problems(qp.with_points({}, version=0), qp.with_points({}, 3)))
    # the device's patch check is this function (plus its model's smoothing Divs)
    from client.runtime import DeviceRuntime, PatchRefused
    rt = DeviceRuntime.__new__(DeviceRuntime)
    rt.qparams, rt.linears = qp, {p: (w, None) for p, w in WEIGHTS.items()}
    bad = qp.with_points({k: PointParams(spec, np.float32(3e38), qp.points[k].zero_point)}, version=1)
    with pytest.raises(PatchRefused, match=r"outside \[2\^-24, 2\^64\]"):
        rt._check(bad)
    assert rt._check(qp.with_points({}, version=1)).version == 1


def test_eval_sums_that_overflow_do_not_raise():
    cfg = ServerConfig(schedule=[{"job": "eval"}])
    state = initial_state(INITIAL, "d")
    ins = instructions_for(state, 1, cfg.schedule[0], cfg)["u8"]
    m = {"num-examples": 4, "tokens": 10, "nll_sum": 1.7e308, "version": 0}
    acc = [Accepted(f"c{i}", 4, validate_eval_metrics(m, ins, cfg.validation)) for i in range(3)]
    new, metrics = apply_round(state, 1, cfg.schedule[0], {"u8": acc}, [], cfg)
    assert metrics["eval"]["u8"]["perplexity"] == math.inf


# ---------------------------------------------------------------------------------------------
# Decoding costs at most about twice a reply's bytes

def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_decoding_costs_at_most_the_reply_s_bytes_again_whatever_its_header_says():
    """A 2 MiB reply whose 64 index entries each name the whole flat array: copying every entry
    before checking overlaps cost 64 times the reply (128 MiB); now the index is checked first and
    the copies of an accepted reply add at most its own bytes."""
    n = (2 << 20) // 4
    flat = {"float32": np.zeros(n, np.float32)}
    nbytes = flat["float32"].nbytes
    header = {"format": "fedquant.wire/1", "kind": "lsq", "round": 1, "version": 0, "request": "0" * 16,
              "index": [[f"a{i}", "float32", 0, [n]] for i in range(64)]}

    def decode():
        with pytest.raises(ValueError, match="overlaps"):
            unpack(flat, header["index"])
    peak = traced_peak(decode)
    assert peak < 0.1 * nbytes, f"decoding a refused {nbytes}-byte reply took {peak} bytes"
    # through the validator (the header as it comes off the wire): refused before any copy
    cfg = ServerConfig(schedule=[{"job": "lsq"}])
    ins = instructions_for(initial_state(INITIAL, "d"), 1, cfg.schedule[0], cfg)["u8"]
    header = {**header, "request": ins.digest}
    text = json.dumps(header)
    peak = traced_peak(lambda: validate_lsq_reply(flat, text, ins, 12))
    assert peak < 0.1 * nbytes, peak
    # a valid payload: the copies are the reply's bytes once
    arrays = {f"a{i}": np.arange(n // 64, dtype=np.float32) for i in range(64)}
    flat, index = pack(arrays)
    peak = traced_peak(lambda: unpack(flat, index))
    assert peak < 1.1 * sum(a.nbytes for a in flat.values()), peak


def test_a_reply_header_longer_than_its_arrays_need_is_refused_before_it_is_parsed():
    cfg = ServerConfig(schedule=[{"job": "lsq"}])
    ins = instructions_for(initial_state(INITIAL, "d"), 1, cfg.schedule[0], cfg)["u8"]
    reply = LsqReply({k: np.float32(0.01) for k in KEYS}, {k: np.float32(0.0) for k in KEYS}, 2.0, 1.9)
    flat, header = encode_lsq_reply(reply, ins)
    assert isinstance(validate_lsq_reply(flat, json.dumps(header, indent=4), ins, 12), LsqReply)
    padded = {**header, "index": header["index"] + [[f"p{i}", "float32", 0, [0]] for i in range(50_000)]}
    text = json.dumps(padded)
    r = validate_lsq_reply(flat, text, ins, 12)
    assert isinstance(r, Rejection) and r.code == "too_large"
    assert traced_peak(lambda: validate_lsq_reply(flat, text, ins, 12)) < len(text)


def test_a_statistics_instruction_without_grids_still_decodes_on_a_device():
    """After a scouting round that no valid reply reached, the statistics round has no grids; its
    instruction used to lack the (empty) grid arrays, and every device refused it."""
    cfg = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}])
    state, _ = apply_round(initial_state(INITIAL, "d"), 1, cfg.schedule[0], {}, [Rejection("nan")], cfg)
    ins = instructions_for(state, 2, cfg.schedule[1], cfg)["u8"]
    assert ins.keys == () and decode_instruction(*encode_instruction(ins)).digest == ins.digest

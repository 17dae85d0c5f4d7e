"""The server's fast paths give exactly what the checked, per-point reference code gives: decoded
statistics, their sums, calibrated ranges and lsq verdicts, bit for bit, error messages included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import quant.calibrate as cal
import quant.stats as stats_mod
from quant.qparams import PointParams, QParams
from quant.spec import QuantSpec, activation_spec, weight_spec
from quant.stats import ActivationStats, Grid, grid_from_absmax, merge, merge_all, observe
from quant.wire import (Instruction, LsqReply, StatsReply, WireError, decode_stats_reply, encode_lsq_reply,
                        encode_stats_reply, pack, unpack)
from server.validate import Rejection, ValidationConfig, _check_lsq_point, validate_lsq_reply

torch.set_num_threads(1)
SETTINGS = settings(max_examples=60, deadline=None)
SPECS = [activation_spec(8), QuantSpec(bits=8, symmetric=True), activation_spec(4), activation_spec(16),
         QuantSpec(bits=4, signed=True, symmetric=True), activation_spec(8, signed=True)]


def values(rng, size):
    """float32 values with outliers, infinities, exact zeros of both signs and one-sided cases."""
    x = (rng.standard_normal(size) * rng.uniform(0.01, 5) + rng.choice([0.0, 2.0, -1.0])).astype(np.float32)
    kind = rng.integers(0, 6)
    if kind == 0 and size:
        x[: rng.integers(1, 4)] *= 300
    elif kind == 1 and size:
        x[0] = rng.choice([np.inf, -np.inf])
    elif kind == 2:
        x = -np.abs(x)
    elif kind == 3:
        x[: size // 2] = rng.choice([0.0, -0.0])
    return x


def same_stats(a: ActivationStats, b: ActivationStats) -> bool:
    return (a == b and a.counts.dtype == b.counts.dtype == np.int64 and not a.counts.flags.writeable
            and all(type(getattr(a, f)) is type(getattr(b, f)) for f in ("below", "above", "min", "max", "n"))
            and math.copysign(1, a.min) == math.copysign(1, b.min)
            and math.copysign(1, a.max) == math.copysign(1, b.max))


# ---------------------------------------------------------------------------------------------
# ActivationStats.unchecked and decode_stats_reply

@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bins=st.sampled_from([2, 7, 64]))
def test_unchecked_constructor_equals_the_checked_one(seed, bins):
    rng = np.random.default_rng(seed)
    g = grid_from_absmax([rng.uniform(0.1, 4)], bins)
    s = observe(values(rng, int(rng.integers(0, 50))), g)
    d = s.to_arrays()
    t = ActivationStats.unchecked(g, d["counts"], int(d["below_above"][0]), int(d["below_above"][1]),
                                  float(d["min_max"][0]), float(d["min_max"][1]), int(d["n"]))
    assert same_stats(t, ActivationStats.from_arrays(d)) and same_stats(t, s)


KEYS = ("a:input", "b:input", "c:input", "d:input")
QP = QParams({k: PointParams(activation_spec(8), np.float32(0.02), np.uint8(128)) for k in KEYS}, "fp", 1)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bins=st.sampled_from([2, 16, 33]), data=st.data())
def test_decode_stats_reply_equals_per_point_from_arrays(seed, bins, data):
    """Valid replies decode to what from_arrays gives per point; a reply with damaged min/max or
    below/above is refused iff from_arrays refuses a point, with the first such point's words."""
    rng = np.random.default_rng(seed)
    ins = Instruction(3, "stats", QP, grids={k: grid_from_absmax([rng.uniform(0.1, 3)], bins) for k in KEYS})
    reply = StatsReply({k: observe(values(rng, int(rng.integers(0, 40))), ins.grids[k]) for k in KEYS})
    flat, header = encode_stats_reply(reply, ins)
    arrays = unpack(flat, header["index"])
    for _ in range(data.draw(st.integers(0, 3))):          # damage: any min/max, any split of below/above
        j = data.draw(st.integers(0, len(KEYS) - 1))
        g = ins.grids[KEYS[j]]
        pick = st.sampled_from([*g.edges().tolist(), math.inf, -math.inf, 0.0, -0.0, g.lo - 1, g.hi + 1])
        arrays["min_max"][j] = [data.draw(pick), data.draw(pick)]
        out = int(arrays["below_above"][j].sum())
        b = data.draw(st.integers(0, out))
        arrays["below_above"][j] = [b, out - b]
    flat, index = pack(arrays)
    header = {**header, "index": index}
    starts = np.concatenate([[0], np.cumsum([ins.grids[k].bins for k in KEYS])])
    expected = None
    for j, k in enumerate(KEYS):
        g = ins.grids[k]
        try:
            ActivationStats.from_arrays({"lo_hi": np.array([g.lo, g.hi]), "counts": arrays["counts"][starts[j]:starts[j + 1]],
                                         "below_above": arrays["below_above"][j], "min_max": arrays["min_max"][j],
                                         "n": arrays["n"][j]})
        except ValueError as e:
            expected = f"inconsistent: {k}: {e}"
            break
    if expected is None:
        got = decode_stats_reply(flat, header, ins)
        for j, k in enumerate(KEYS):
            g = ins.grids[k]
            ref = ActivationStats.from_arrays({
                "lo_hi": np.array([g.lo, g.hi]), "counts": arrays["counts"][starts[j]:starts[j + 1]],
                "below_above": arrays["below_above"][j], "min_max": arrays["min_max"][j], "n": arrays["n"][j]})
            assert same_stats(got.stats[k], ref), k
            assert got.stats[k].grid == g
    else:
        with pytest.raises(WireError) as e:
            decode_stats_reply(flat, header, ins)
        assert str(e.value) == expected


@pytest.mark.parametrize("min_max,below_above", [
    ((-9.0, -8.0), (1, 1)),        # nothing in the bins, max below the grid although above > 0
    ((8.0, 9.0), (1, 1)),          # min above the grid although below > 0
    ((-9.0, 9.0), (1, 1)),         # fine
    ((math.inf, -math.inf), (1, 1)),
])
def test_decode_stats_reply_corner_cases_match_from_arrays(min_max, below_above):
    g = grid_from_absmax([1.0], 8)
    ins = Instruction(3, "stats", QP, grids={k: g for k in KEYS})
    empty = ActivationStats(g, np.zeros(8, np.int64), 1, 1, -9.0, 9.0, 2)
    flat, header = encode_stats_reply(StatsReply({k: empty for k in KEYS}), ins)
    arrays = unpack(flat, header["index"])
    arrays["min_max"][2], arrays["below_above"][2] = min_max, below_above
    flat, index = pack(arrays)
    d = {"lo_hi": np.array([g.lo, g.hi]), "counts": np.zeros(8, np.int64), "below_above": np.array(below_above),
         "min_max": np.array(min_max), "n": np.array(2)}
    try:
        ref = ActivationStats.from_arrays(d)
    except ValueError as e:
        with pytest.raises(WireError, match="inconsistent") as got:
            decode_stats_reply(flat, {**header, "index": index}, ins)
        assert str(got.value) == f"inconsistent: {KEYS[2]}: {e}"
    else:
        assert same_stats(decode_stats_reply(flat, {**header, "index": index}, ins).stats[KEYS[2]], ref)


# ---------------------------------------------------------------------------------------------
# merge_all

@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), parts=st.integers(1, 12), chunk=st.sampled_from([2, 3, 256]))
def test_merge_all_equals_the_pairwise_fold(seed, parts, chunk):
    rng = np.random.default_rng(seed)
    g = grid_from_absmax([2.0], 16)
    xs = [observe(values(rng, int(rng.integers(0, 20))), g) for _ in range(parts)]
    if parts > 1:            # a grid equal to, but not the same object as, the first's
        xs[1] = ActivationStats(Grid(g.lo, g.hi, g.bins), xs[1].counts, xs[1].below, xs[1].above,
                                xs[1].min, xs[1].max, xs[1].n)
    fold = xs[0]
    for s in xs[1:]:
        fold = merge(fold, s)
    old = stats_mod._MERGE_CHUNK
    stats_mod._MERGE_CHUNK = chunk
    try:
        got = merge_all(iter(xs))
    finally:
        stats_mod._MERGE_CHUNK = old
    assert same_stats(got, fold) and got.grid is xs[0].grid


def test_merge_all_keeps_the_first_of_equal_extremes_and_names_a_grid_mismatch():
    g = grid_from_absmax([1.0], 8)
    a = ActivationStats(g, np.zeros(8, np.int64), 1, 0, -0.0, 0.0, 1)
    b = ActivationStats(g, np.zeros(8, np.int64), 1, 0, 0.0, -0.0, 1)
    for x, y in ((a, b), (b, a)):
        m = merge_all([x, y])
        assert math.copysign(1, m.min) == math.copysign(1, x.min) and math.copysign(1, m.max) == math.copysign(1, x.max)
    with pytest.raises(ValueError, match="bins"):
        merge_all([a, a, ActivationStats.empty(g.lo, g.hi, 16)])
    with pytest.raises(ValueError, match="at least one"):
        merge_all([])


# ---------------------------------------------------------------------------------------------
# validate_lsq_reply

LQP = QParams({"a:input": PointParams(activation_spec(8), np.float32(0.02), np.uint8(128)),
               "b:input": PointParams(activation_spec(16), np.float32(0.001), np.int16(0)),
               "c:input": PointParams(activation_spec(8, signed=True), np.float32(0.05), np.int8(-10)),
               "c:weight": PointParams(weight_spec(8), np.full(4, 0.01), np.zeros(4)),
               "d:weight": PointParams(weight_spec(4), np.full(3, 0.2), np.zeros(3))}, "fp", 2)
LSQ = Instruction(4, "lsq", LQP, keys=list(LQP.points))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), step=st.sampled_from([0.3, math.log(8)]),
       max_scale=st.sampled_from([1e6, 0.03]))
def test_validate_lsq_reply_equals_the_per_point_checks(seed, step, max_scale):
    rng = np.random.default_rng(seed)
    shapes = {k: LQP.points[k].scale.shape for k in LSQ.keys}
    scale = rng.choice([0.01, 0.3, 1.0, 3.0])
    reply = LsqReply({k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()},
                     {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}, 2.0, 1.5)
    config = ValidationConfig(max_log_scale_step=step, max_scale=max_scale)
    got = validate_lsq_reply(*encode_lsq_reply(reply, LSQ), LSQ, 10, config)
    expected = None
    for k in LSQ.keys:
        try:
            _check_lsq_point(k, LQP.points[k], reply.delta_log_s[k], reply.delta_beta[k], config)
        except WireError as e:
            expected = Rejection(e.code, str(e)[:300])
            break
    if expected is None:
        assert isinstance(got, LsqReply)
        for k in LSQ.keys:
            assert np.array_equal(got.delta_log_s[k], reply.delta_log_s[k]) and got.delta_log_s[k].shape == shapes[k]
            assert np.array_equal(got.delta_beta[k], reply.delta_beta[k])
    else:
        assert got == expected


# ---------------------------------------------------------------------------------------------
# MSE calibration

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), spec=st.sampled_from(SPECS), bins=st.sampled_from([2, 16, 64, 512]))
def test_fast_sq_error_equals_the_reference_bit_for_bit(seed, spec, bins):
    rng = np.random.default_rng(seed)
    x = values(rng, int(rng.integers(1, 3000)))
    finite = x[np.isfinite(x)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    st_ = observe(x, grid_from_absmax([top * rng.uniform(0.2, 1.5)], bins))
    a, b, m = cal._cells(st_)
    mn, mx = cal._extremes(st_)
    lo = np.minimum(rng.uniform(mn - 1, mx, 40), 0.0)
    hi = np.maximum(lo + rng.exponential(2, 40), 0.0)
    lo[:3], hi[:3] = min(mn, 0.0), max(mx, 0.0)
    fast = cal._sq_error_fn(a, b, m, spec)
    ref = cal._sq_error(a, b, m, lo, hi, spec)
    assert fast(lo, hi).tobytes() == ref.tobytes()
    assert fast(lo[::-1], hi[::-1])[::-1].tobytes() == ref.tobytes()      # memoized rows, other batch


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), spec=st.sampled_from(SPECS), bins=st.sampled_from([16, 512]))
def test_mse_range_is_what_the_reference_cost_gives(seed, spec, bins):
    rng = np.random.default_rng(seed)
    x = values(rng, 2000)
    finite = x[np.isfinite(x)]
    st_ = observe(x, grid_from_absmax([float(np.abs(finite).max()) * rng.uniform(0.3, 1.2)], bins))
    got = cal.mse_range(st_, spec, steps=24)
    fast = cal._sq_error_fn
    cal._sq_error_fn = lambda a, b, m, spec_: (lambda lo, hi: cal._sq_error(a, b, m, lo, hi, spec_))
    try:
        ref = cal.mse_range(st_, spec, steps=24)
    finally:
        cal._sq_error_fn = fast
    assert np.array(got).tobytes() == np.array(ref).tobytes()

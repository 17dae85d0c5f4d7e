"""Aggregation rules: exact sums, robust rules that bound a poisoned minority, FedAdam by hand,
zero-points derived from averaged (log s, beta) and never averaged."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quant.affine import range_to_qparams
from quant.calibrate import CalibratorConfig, calibrate
from quant.lsq import init_from_qparams, to_qparams
from quant.qparams import PointParams
from quant.spec import activation_spec, weight_spec
from quant.stats import ActivationStats, channel_absmax, grid_from_absmax, observe
from quant.wire import ScoutReply
from server.aggregate import (bounded_extremes, bounded_step, capped_weights, clip_scouting, coordinate_median, fedadam_step, fedavg_step,
                              grids_from_scouting, learned_from_qparams, max_absmax, ranges_for_profile,
                              sum_statistics, to_integer_qparams, trimmed_mean, trimmed_statistics,
                              weighted_mean)

torch.set_num_threads(1)
SETTINGS = settings(max_examples=60, deadline=None)
GRID = grid_from_absmax([4.0], 64)


# ---------------------------------------------------------------------------------------------
# Exact rules

@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 6), st.data())
def test_sum_of_statistics_equals_the_pooled_data_in_any_order(seed, clients, data):
    rng = np.random.default_rng(seed)
    x = {k: (rng.standard_t(3, size=200) * (i + 1)).astype(np.float32) for i, k in enumerate("ab")}
    cuts = sorted(data.draw(st.lists(st.integers(0, 200), min_size=clients - 1, max_size=clients - 1)))
    parts = [{k: observe(v[lo:hi], GRID) for k, v in x.items()} for lo, hi in zip([0, *cuts], [*cuts, 200])]
    order = data.draw(st.permutations(range(clients)))
    merged = sum_statistics([parts[i] for i in order])
    for k, v in x.items():
        assert merged[k] == observe(v, GRID)


def test_max_absmax_is_exact_and_profiles_share_one_merged_histogram():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(30, 8)).astype(np.float32) * (i + 1) for i in range(4)]
    merged = max_absmax([{"p": channel_absmax(x)} for x in xs])
    np.testing.assert_array_equal(merged["p"], channel_absmax(np.concatenate(xs)))
    stats = sum_statistics([{"p": observe(x, GRID)} for x in xs])
    pooled = observe(np.concatenate(xs), GRID)
    cfg = CalibratorConfig(method="mse")
    for spec in (activation_spec(8), activation_spec(4), activation_spec(16)):
        got = ranges_for_profile(stats, {"p": spec}, cfg)["p"]
        assert got.spec == spec
        lo, hi = calibrate(pooled, spec, cfg)
        s, z = range_to_qparams(lo, hi, spec)
        assert got.scale == s and got.zero_point == z
    with pytest.raises(ValueError, match="no merged statistics"):
        ranges_for_profile(stats, {"q": activation_spec(8)}, cfg)


def test_grids_from_scouting_ignore_a_freak_report():
    honest = [ScoutReply({"p": (-1.0 - i / 10, 2.0 + i / 10), "r": (0.0, 1.0)}, {"p": 10, "r": 10}) for i in range(19)]
    freak = ScoutReply({"p": (-1e6, 1e6), "r": (0.0, 1.0)}, {"p": 10, "r": 10})
    silent = ScoutReply({"p": (math.inf, -math.inf), "r": (0.0, 1.0)}, {"p": 0, "r": 10})
    g = grids_from_scouting([*honest, freak, silent], bins=128)
    assert g["p"].hi < 10 and g["p"].lo < 0 and g["p"].hi >= 1.25 * 3.5 and g["p"].bins == 128
    assert g["r"].lo == 0 and g["r"].hi >= 1.25


# ---------------------------------------------------------------------------------------------
# Delta rules

def test_weighted_mean_by_hand():
    d = [{"a": np.array([1.0, 2.0])}, {"a": np.array([3.0, 6.0])}]
    np.testing.assert_allclose(weighted_mean(d, [3, 1])["a"], [1.5, 3.0])
    for bad in ([1], [0, 0], [1, -1], [1, math.nan]):
        with pytest.raises(ValueError):
            weighted_mean(d, bad)
    with pytest.raises(ValueError, match="names"):
        weighted_mean([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shapes"):
        coordinate_median([{"a": np.zeros(2)}, {"a": np.zeros(3)}])


def test_robust_rules_bound_a_poisoned_minority_and_the_mean_does_not():
    rng = np.random.default_rng(2)
    honest = [{"log_s": rng.normal(0.01, 0.002, size=3), "beta": rng.normal(-0.1, 0.01, size=3)} for _ in range(8)]
    lo = {k: np.min([h[k] for h in honest], axis=0) for k in honest[0]}
    hi = {k: np.max([h[k] for h in honest], axis=0) for k in honest[0]}
    for poison in (math.log(8), 1e6):                       # valid-looking, and absurd
        bad = [{"log_s": np.full(3, poison), "beta": np.full(3, -poison)}] * 2
        clients = honest[:4] + bad + honest[4:]
        for result in (coordinate_median(clients), trimmed_mean(clients, 0.2)):
            for k in lo:
                assert np.all(result[k] >= lo[k]) and np.all(result[k] <= hi[k])
        mean = weighted_mean(clients, [1] * 10)
        assert np.all(mean["log_s"] > 0.19 * poison)        # dragged by 2/10 of the poison


@SETTINGS
@given(st.integers(0, 2**31), st.integers(3, 15), st.floats(0.0, 0.49))
def test_robust_rules_stay_within_the_honest_range(seed, n, trim):
    rng = np.random.default_rng(seed)
    b = math.floor(trim * n)
    bad_med, bad_trim = (n - 1) // 2, b                    # at most this many bad clients
    vals = rng.normal(size=(n, 4))
    poison = rng.choice([-1e9, 1e9, 0.0, 1e-3], size=(n, 4))
    for n_bad, rule in ((bad_med, coordinate_median), (bad_trim, lambda d: trimmed_mean(d, trim))):
        x = vals.copy()
        x[:n_bad] = poison[:n_bad]
        out = rule([{"d": row} for row in x])["d"]
        honest = vals[n_bad:]
        assert np.all(out >= honest.min(axis=0) - 1e-12) and np.all(out <= honest.max(axis=0) + 1e-12)
    np.testing.assert_allclose(trimmed_mean([{"d": r} for r in vals], 0.0)["d"], vals.mean(axis=0))


# ---------------------------------------------------------------------------------------------
# Bounded influence

def _share_at_or_below(s: ActivationStats) -> np.ndarray:
    """The share of a statistics' values in or below each of its cells (below, bins, above)."""
    return np.cumsum(np.concatenate([[s.below], s.counts, [s.above]]))[:-1] / s.n


def _hostile_stats(rng, grid) -> ActivationStats:
    """A well-formed reply an attacker could send: extreme n, mass at the grid's edges, values far
    outside it (finite or infinite)."""
    kind = rng.integers(4)
    n = int(rng.choice([1, 2, 10**6, 2**40]))
    counts = np.zeros(grid.bins, dtype=np.int64)
    if kind == 0:                                        # everything in the top bin
        counts[-1] = n
        return ActivationStats(grid, counts, 0, 0, grid.hi - grid.width / 2, grid.hi - grid.width / 2, n)
    if kind == 1:                                        # everything far above
        return ActivationStats(grid, counts, 0, n, grid.hi, float(rng.choice([1e4, 1e308, math.inf])), n)
    if kind == 2:                                        # everything far below
        return ActivationStats(grid, counts, n, 0, float(rng.choice([-1e4, -1e308, -math.inf])), grid.lo, n)
    counts[0] = n // 2                                   # both edges
    return ActivationStats(grid, counts, 0, n - n // 2, grid.lo, 1e30, n)


@SETTINGS
@given(st.integers(0, 2**31), st.integers(3, 14), st.floats(0.0, 0.49))
def test_trimmed_statistics_stay_within_the_honest_clients_whatever_a_minority_sends(seed, k, trim):
    """With at most floor(trim k) bad clients, at every edge the merged share of values below it
    lies within the honest clients' shares (to the integer rounding of the counts); min and max
    lie within the honest clients' extremes; the total is k times an honest client's n at most;
    and the result is valid statistics (a resumed run loads it)."""
    rng = np.random.default_rng(seed)
    b = math.floor(trim * k)
    honest = [observe(rng.standard_t(3, size=int(rng.integers(50, 400))) * rng.uniform(0.5, 2), GRID)
              for _ in range(k - b)]
    bad = [_hostile_stats(rng, GRID) for _ in range(b)]
    clients = [*bad, *honest]
    rng.shuffle(clients)
    out = trimmed_statistics(clients, trim)
    assert ActivationStats.from_arrays(out.to_arrays()) == out
    shares = np.stack([_share_at_or_below(h) for h in honest])
    got = _share_at_or_below(out)
    tol = 1.0 / out.n
    assert np.all(got >= shares.min(axis=0) - tol) and np.all(got <= shares.max(axis=0) + tol)
    assert min(h.min for h in honest) <= out.min and out.max <= max(h.max for h in honest)
    assert out.n <= k * max(h.n for h in honest)


def test_trimmed_statistics_of_equal_clients_are_their_sum_and_trim_zero_is_the_mean_shape():
    rng = np.random.default_rng(0)
    one = observe(rng.normal(size=500).astype(np.float32), GRID)
    assert trimmed_statistics([one] * 5, 0.3) == sum_statistics([{"a": one}] * 5)["a"]
    parts = [observe(rng.normal(size=300).astype(np.float32) * (i + 1), GRID) for i in range(4)]
    out = trimmed_statistics(parts, 0.0)           # equal n, nothing trimmed: the pooled histogram
    assert out == sum_statistics([{"a": p} for p in parts])["a"]
    empty = ActivationStats.empty(GRID.lo, GRID.hi, GRID.bins)
    assert trimmed_statistics([empty, one], 0.4) == one        # an empty reply takes no part
    assert trimmed_statistics([empty], 0.1) == empty
    with pytest.raises(ValueError, match="trim"):
        trimmed_statistics([one], 0.5)


def test_an_outlier_pair_from_one_client_sets_the_range_of_the_sum_but_not_of_the_trimmed_merge():
    """The issue's attack: two values far above the grid (one client of ten) stretch a min-max
    range x1000 when summed; trimmed, the range is the honest one."""
    rng = np.random.default_rng(1)
    honest = [observe(rng.normal(size=1000).astype(np.float32), GRID) for _ in range(9)]
    h = honest[0]
    bad = ActivationStats(GRID, h.counts, h.below, h.above + 2, h.min, 1e4, h.n + 2)
    spec = activation_spec(8)
    mm = CalibratorConfig(method="minmax")
    clean = calibrate(trimmed_statistics(honest, 0.1), spec, mm)
    assert calibrate(sum_statistics([{"a": s} for s in [*honest, bad]])["a"], spec, mm)[1] == 1e4
    assert calibrate(trimmed_statistics([*honest, bad], 0.1), spec, mm)[1] <= max(s.max for s in honest)
    assert clean[1] == max(s.max for s in honest)


def test_clipped_scouting_bounds_a_minoritys_abs_max_and_leaves_honest_reports():
    rng = np.random.default_rng(2)
    honest = [ScoutReply({"x": (-a, a)}, {"x": 10}, {"x": rng.uniform(1, 2, 8).astype(np.float32)})
              for a in rng.uniform(1, 2, 7)]
    bad = [ScoutReply({"x": (-1e30, 1e30)}, {"x": 10}, {"x": np.full(8, 3e38, np.float32)}) for _ in range(3)]
    out = clip_scouting([*bad, *honest], 4.0)
    merged = max_absmax([r.channel_absmax for r in out])["x"]
    assert np.all(merged <= 4 * max_absmax([r.channel_absmax for r in honest])["x"])
    assert max(r.absmax["x"] for r in out) <= 4 * max(r.absmax["x"] for r in honest)
    for r, o in zip(honest, out[3:]):                  # within 4x the median: untouched
        assert o.ranges == r.ranges and np.array_equal(o.channel_absmax["x"], r.channel_absmax["x"])
    grid = grids_from_scouting(out, 64, 1.25, 1.0)["x"]
    assert grid.hi <= 4 * 1.25 * 2 * 1.01
    with pytest.raises(ValueError, match="multiple"):
        clip_scouting(honest, 0.5)


def test_with_two_reports_the_inflated_one_is_capped_by_the_other():
    honest = ScoutReply({"x": (-1.0, 2.0)}, {"x": 5}, {"x": np.array([1.0, 2.0], np.float32)})
    bad = ScoutReply({"x": (-1e4, 1e4)}, {"x": 5}, {"x": np.array([1e4, 1e4], np.float32)})
    out = clip_scouting([bad, honest], 4.0)
    assert out[0].ranges["x"] == (-8.0, 8.0) and out[0].channel_absmax["x"].tolist() == [4.0, 8.0]
    assert out[1].ranges == honest.ranges


def test_bounded_extremes_clamp_min_and_max_and_nothing_else():
    rng = np.random.default_rng(3)
    s = observe(np.concatenate([rng.normal(size=100), [-1e4, 1e30]]).astype(np.float32), GRID)
    b = bounded_extremes(s, 4 * GRID.hi)
    assert (b.min, b.max) == (-4 * GRID.hi, 4 * GRID.hi) and b.total == s.total == b.n
    assert np.array_equal(b.counts, s.counts) and (b.below, b.above) == (s.below, s.above)
    assert ActivationStats.from_arrays(b.to_arrays()) == b
    inside = observe(rng.normal(size=50).astype(np.float32), GRID)
    assert bounded_extremes(inside, GRID.hi) is inside
    # every value beyond the limit on one side (a grid far off the round's values): both extremes at
    # the limit, still statistics a checkpoint and a device accept (min > max made the round raise)
    for sign in (1, -1):
        far = bounded_extremes(observe(np.full(10, sign * 1e3, np.float32), GRID), 4 * GRID.hi)
        assert far.min == far.max == sign * 4 * GRID.hi and far.n == 10
        assert ActivationStats.from_arrays(far.to_arrays()) == far
    with pytest.raises(ValueError, match="inside the grid"):
        bounded_extremes(s, GRID.hi / 2)
    assert bounded_step(np.array([-3.0, 0.5, 9.0]), math.log(4)).tolist() == [-math.log(4), 0.5, math.log(4)]


def test_capped_weights_count_no_claim_above_the_median_claim():
    assert capped_weights([3, 1, 10**6]) == [3, 1, 3]
    assert capped_weights([5, 5, 5, 10**9]) == [5, 5, 5, 5]
    assert capped_weights([]) == []


# ---------------------------------------------------------------------------------------------
# Server optimizers

def test_fedavg_step():
    out = fedavg_step({"a": np.array([1.0, 2.0])}, {"a": np.array([0.5, -1.0])}, lr=0.5)
    np.testing.assert_allclose(out["a"], [1.25, 1.5])
    with pytest.raises(ValueError):
        fedavg_step({"a": np.zeros(2)}, {"b": np.zeros(2)})


def test_fedadam_matches_a_hand_computation_for_two_steps():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0 = {"p": np.array([0.0, 1.0])}
    d1, d2 = {"p": np.array([0.2, -0.1])}, {"p": np.array([0.1, 0.3])}
    x1, s1 = fedadam_step(x0, d1, {}, lr, b1, b2, tau)
    # step 1, coordinate 0: m = 0.1 * 0.2 = 0.02; v = 0.99 * 1e-6 + 0.01 * 0.04 = 0.00040099
    m, v = 0.02, 0.99e-6 + 0.0004
    assert s1["m/p"][0] == pytest.approx(m, rel=1e-12) and s1["v/p"][0] == pytest.approx(v, rel=1e-12)
    assert x1["p"][0] == pytest.approx(0.1 * m / (math.sqrt(v) + tau), rel=1e-12)
    x2, s2 = fedadam_step(x1, d2, s1, lr, b1, b2, tau)
    m2, v2 = 0.9 * m + 0.1 * 0.1, 0.99 * v + 0.01 * 0.01
    assert x2["p"][0] == pytest.approx(x1["p"][0] + 0.1 * m2 / (math.sqrt(v2) + tau), rel=1e-12)
    # coordinate 1, both steps
    m, v = -0.01, 0.99e-6 + 0.0001
    x = 1.0 + 0.1 * m / (math.sqrt(v) + tau)
    m, v = 0.9 * m + 0.1 * 0.3, 0.99 * v + 0.01 * 0.09
    assert x2["p"][1] == pytest.approx(x + 0.1 * m / (math.sqrt(v) + tau), rel=1e-12)
    assert x0["p"].tolist() == [0.0, 1.0] and s1["m/p"][0] == pytest.approx(0.02)   # inputs untouched
    np.savez(io.BytesIO(), **s2)             # the state is plain arrays: checkpointable


# ---------------------------------------------------------------------------------------------
# (s, z) <-> (log s, beta)

def test_learned_params_match_lsq_and_round_trip():
    pts = {"a": PointParams(activation_spec(8), np.float32(0.0173), np.uint8(97)),
           "w": PointParams(weight_spec(8), np.linspace(0.01, 0.02, 5), np.zeros(5)),
           "s": PointParams(activation_spec(8, signed=True), np.float32(0.05), np.int8(-20))}
    log_s, beta = learned_from_qparams(pts)
    for k, p in pts.items():
        ls_t, b_t = init_from_qparams(p.scale, p.zero_point, p.spec)
        np.testing.assert_array_equal(log_s[k], ls_t.numpy())
        np.testing.assert_array_equal(beta[k], b_t.numpy())
    back = to_integer_qparams(log_s, beta, {k: p.spec for k, p in pts.items()})
    for k, p in pts.items():
        np.testing.assert_array_equal(back[k].scale, p.scale)
        np.testing.assert_array_equal(back[k].zero_point, p.zero_point)


def test_zero_points_come_from_averaged_log_s_and_beta_never_from_averaged_z():
    spec = activation_spec(8)                               # uint8, asymmetric
    a = PointParams(spec, np.float32(0.01), np.uint8(0))    # range [0, 2.55]
    b = PointParams(spec, np.float32(0.02), np.uint8(200))  # range [-4.0, 1.1]
    la, ba = learned_from_qparams({"p": a})
    lb, bb = learned_from_qparams({"p": b})
    log_s = weighted_mean([la, lb], [1, 1])
    beta = weighted_mean([ba, bb], [1, 1])
    got = to_integer_qparams(log_s, beta, {"p": spec})["p"]
    s = math.sqrt(0.01 * 0.02)
    assert got.scale == pytest.approx(s, rel=1e-6)
    assert int(got.zero_point) == round(2.0 / s) == 141     # -beta / s with beta = -(0 + 4.0) / 2
    assert int(got.zero_point) != (0 + 200) // 2            # what averaging z would give
    assert (got.scale, got.zero_point) == tuple(to_qparams(log_s["p"], beta["p"], spec))


def test_smoothquant_factors_balance_ranges_and_keep_the_product():
    """At alpha 0.5 every live channel has the same range in the smoothed input and the smoothed
    weight; any alpha leaves the float product unchanged; dead channels keep m = 1."""
    from server.aggregate import max_absmax, smoothquant_factors

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 16)) * np.r_[np.ones(15), 300.0]).astype(np.float32)  # one outlier channel
    w = rng.standard_normal((8, 16))
    w[:, 3] = 0.0                                                        # a dead weight column
    clients = [np.abs(x[i::4]).max(axis=0) for i in range(4)]           # four clients' abs-max
    merged = max_absmax([{"l": c} for c in clients])["l"]
    np.testing.assert_array_equal(merged, np.abs(x).max(axis=0))
    m = smoothquant_factors({"l": merged}, {"l": w}, alpha=0.5)["l"].astype(np.float64)
    assert m[3] == 1.0
    live = np.arange(16) != 3
    np.testing.assert_allclose((np.abs(x).max(axis=0) / m)[live], (np.abs(w).max(axis=0) * m)[live], rtol=1e-6)
    assert m[15] > 10 * np.median(m[live])                               # the outlier moves into the weight
    for a in (0.0, 0.5, 0.8, 1.0):
        m = smoothquant_factors({"l": merged}, {"l": w}, alpha=a)["l"].astype(np.float64)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose((x64 / m) @ (w * m).T, x64 @ w.T, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_factors({"l": merged}, {"l": w}, alpha=1.5)
    with pytest.raises(ValueError, match="inputs"):
        smoothquant_factors({"l": merged[:8]}, {"l": w})

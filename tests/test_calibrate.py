"""Calibrators: from merged statistics to a range, judged by the SQNR of the fake-quant they give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from quant.affine import fake_quant, range_to_qparams
from quant.calibrate import (CalibratorConfig, calibrate, entropy_range, expected_mse, minmax_range,
                             mse_range, percentile_range)
from quant.spec import QuantSpec, activation_spec
from quant.stats import grid_from_absmax, observe

torch.set_num_threads(1)
U8, S8, U4 = activation_spec(8), QuantSpec(bits=8, symmetric=True), activation_spec(4)
SPECS = [U8, S8, U4, activation_spec(16), QuantSpec(bits=4, signed=True, symmetric=True)]
METHODS = ["minmax", "percentile", "mse", "entropy"]


def sqnr_db(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    s, z = range_to_qparams(lo, hi, spec)
    err = x.astype(np.float64) - fake_quant(x, s, z, spec)
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(err**2)))


def stats_of(x: np.ndarray, bins: int = 2048, absmax: float | None = None):
    return observe(x, grid_from_absmax([np.abs(x).max() if absmax is None else absmax], bins))


@pytest.fixture(scope="module")
def gaussian_with_outliers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1_000_000).astype(np.float32)
    x[:5] = rng.uniform(20, 30, 5) * np.array([1, -1, 1, -1, 1])
    return x, stats_of(x)


def test_minmax_is_the_true_min_max():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(10_000) * 3).astype(np.float32)
    st_ = stats_of(x, 256, absmax=1.0)                     # most values outside the grid
    assert minmax_range(st_) == (float(x.min()), float(x.max()))
    assert calibrate(st_, U8, CalibratorConfig(method="minmax")) == (float(x.min()), float(x.max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.sampled_from([50.0, 90.0, 99.0, 99.9, 100.0]),
       dist=st.sampled_from(["normal", "exponential", "uniform"]))
def test_percentile_within_one_bin_of_the_data_percentile(seed, p, dist):
    rng = np.random.default_rng(seed)
    x = getattr(rng, dist)(size=20_000).astype(np.float32)
    st_ = stats_of(x, 512, absmax=float(np.abs(x).max()) * 1.01)
    lo, hi = percentile_range(st_, U8, p)
    w, cut = st_.grid.width, x.size * (100 - p) / 200
    # Exactly: within one bin of a value that cuts `cut` values off each side. In sparse tails
    # neighbouring order statistics are bins apart, so compare with numpy only where data is dense.
    x64 = np.sort(x.astype(np.float64))
    assert np.sum(x64 < lo - w) <= cut + 1e-6 <= np.sum(x64 <= lo + w) + 2e-6
    assert np.sum(x64 > hi + w) <= cut + 1e-6 <= np.sum(x64 >= hi - w) + 2e-6
    if p <= 90:
        assert abs(lo - np.percentile(x64, (100 - p) / 2)) <= w
        assert abs(hi - np.percentile(x64, 100 - (100 - p) / 2)) <= w


def test_mse_and_entropy_beat_minmax_on_outliers(gaussian_with_outliers):
    x, st_ = gaussian_with_outliers
    base = sqnr_db(x, *minmax_range(st_), U8)
    for method in ("mse", "entropy"):
        r = calibrate(st_, U8, CalibratorConfig(method=method))
        assert sqnr_db(x, *r, U8) > base + 1.0, method
    assert sqnr_db(x, *mse_range(st_, S8), S8) > sqnr_db(x, *minmax_range(st_), S8) + 1.0


def test_expected_mse_matches_the_real_error(gaussian_with_outliers):
    x, st_ = gaussian_with_outliers
    for spec in (U8, U4, S8):
        for lo, hi in [minmax_range(st_), (-3.0, 2.5), (-1.0, 7.0)]:
            s, z = range_to_qparams(lo, hi, spec)
            real = np.mean((x.astype(np.float64) - fake_quant(x, s, z, spec)) ** 2)
            assert expected_mse(st_, lo, hi, spec) == pytest.approx(real, rel=0.03)


def test_uniform_minmax_is_near_optimal_and_mse_no_worse():
    x = np.random.default_rng(2).uniform(-1, 1, 500_000).astype(np.float32)
    st_ = stats_of(x)
    for spec in (U8, S8, U4):
        mm = sqnr_db(x, *minmax_range(st_), spec)
        mse = sqnr_db(x, *mse_range(st_, spec), spec)
        assert mse >= mm - 0.05
        for method in ("percentile", "entropy"):
            assert mm >= sqnr_db(x, *calibrate(st_, spec, CalibratorConfig(method=method)), spec) - 0.3
    assert sqnr_db(x, *minmax_range(st_), S8) == pytest.approx(6.02 * 8 - 0.07, abs=0.3)
    lo, hi = mse_range(st_, U8)
    assert lo == pytest.approx(-1, abs=0.02) and hi == pytest.approx(1, abs=0.02)


def test_four_bits_clip_more_than_eight():
    x = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    st_ = stats_of(x)
    for sym, four, eight in ((False, U4, U8), (True, QuantSpec(bits=4, symmetric=True), S8)):
        lo4, hi4 = mse_range(st_, four)
        lo8, hi8 = mse_range(st_, eight)
        assert hi4 < 0.8 * hi8 and lo4 > 0.8 * lo8, sym
        assert 1.5 < hi4 < 3.5 and 3 < hi8 < float(x.max()) + 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from(SPECS), bins=st.sampled_from([16, 64, 512]),
       shift=st.sampled_from([0.0, 3.0, -1.0]), tail=st.floats(1, 500))
def test_mse_is_never_worse_than_minmax(seed, spec, bins, shift, tail):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(3000) + shift).astype(np.float32)
    x[: rng.integers(0, 4)] *= tail
    st_ = observe(x, grid_from_absmax([np.abs(x).max() * rng.uniform(0.2, 1.5)], bins))
    lo, hi = mse_range(st_, spec, steps=24)
    mn, mx = minmax_range(st_)
    assert mn <= lo <= hi <= mx
    assert expected_mse(st_, lo, hi, spec) <= expected_mse(st_, mn, mx, spec) * (1 + 1e-12)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", METHODS)
def test_every_calibrator_gives_a_usable_range(spec, method, gaussian_with_outliers):
    _, st_ = gaussian_with_outliers
    before = st_.to_arrays()
    lo, hi = calibrate(st_, spec, CalibratorConfig(method=method))
    assert isinstance(lo, float) and isinstance(hi, float)
    assert st_.min <= lo <= hi <= st_.max
    s, _ = range_to_qparams(lo, hi, spec)
    assert s > 0
    assert all(np.array_equal(v, st_.to_arrays()[k]) for k, v in before.items())   # pure


def test_infinities_and_tiny_inputs_give_finite_ranges():
    g = grid_from_absmax([1.0], 64)
    cases = [np.array([-np.inf, 0.5, 0.2, np.inf]), np.array([np.inf, np.inf]), np.zeros(10),
             np.array([0.3]), np.array([-50.0, 60.0, 0.1]), np.full(100, 0.7)]
    for x in cases:
        st_ = observe(x, g)
        for spec in SPECS:
            for method in METHODS:
                lo, hi = calibrate(st_, spec, CalibratorConfig(method=method))
                assert np.isfinite([lo, hi]).all() and lo <= hi, (x, spec, method)


def test_entropy_follows_bit_width(gaussian_with_outliers):
    _, st_ = gaussian_with_outliers
    lo8, hi8 = entropy_range(st_, U8)
    lo4, hi4 = entropy_range(st_, U4)
    assert 3 < hi8 < 8 and -8 < lo8 < -3 and hi4 < hi8
    assert entropy_range(st_, activation_spec(16)) == minmax_range(st_)


@pytest.mark.parametrize("kwargs,field", [
    ({"method": "kl"}, "method"), ({"percentile": 0}, "percentile"),
    ({"percentile": 100.5}, "percentile"), ({"mse_steps": 2}, "mse_steps"), ({"bogus": 1}, "bogus")])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        CalibratorConfig(**kwargs)


def test_calibrate_rejects_what_it_cannot_do(gaussian_with_outliers):
    _, st_ = gaussian_with_outliers
    with pytest.raises(ValueError, match="per-tensor"):
        calibrate(st_, QuantSpec(bits=8, granularity="per_channel", axis=0), CalibratorConfig())
    empty = observe(np.zeros(0, dtype=np.float32), st_.grid)
    with pytest.raises(ValueError, match="empty"):
        calibrate(empty, U8, CalibratorConfig())

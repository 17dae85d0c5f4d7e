"""Mergeable activation statistics: merging is exact, so federated == pooled for any partition."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import quant.stats as stats_mod
from quant.stats import (ActivationStats, Grid, channel_absmax, grid_from_absmax, merge, merge_absmax,
                         merge_all, needs_widening, observe, widen)

torch.set_num_threads(1)
SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def grids(draw):
    bins = draw(st.integers(2, 48))
    w = draw(st.integers(1, 2**20 - 1)) * 2.0 ** draw(st.integers(-40, 20))
    a = draw(st.integers(-3 * bins, 2 * bins))
    return Grid(a * w, (a + bins) * w, bins)


@st.composite
def values_for(draw, grid: Grid, max_size: int = 60):
    """float32 values that like the edges: the edges themselves, their float32 neighbours, values
    outside, +-inf, duplicates, and arbitrary floats."""
    e = grid.edges()
    special = [*e, *np.nextafter(e.astype(np.float32), np.float32(np.inf)),
               *np.nextafter(e.astype(np.float32), np.float32(-np.inf)),
               np.inf, -np.inf, 0.0, -0.0, grid.lo - grid.width, grid.hi + 3 * grid.width]
    f32 = np.float32
    lo32, hi32 = f32(grid.lo), f32(grid.hi)                 # float32 bounds inside the grid
    lo32 = lo32 if lo32 >= grid.lo else np.nextafter(lo32, f32(np.inf))
    hi32 = hi32 if hi32 <= grid.hi else np.nextafter(hi32, f32(-np.inf))
    elements = [st.sampled_from(special), st.floats(width=32, allow_nan=False)]
    if np.isfinite(lo32) and np.isfinite(hi32) and lo32 <= hi32:
        elements.append(st.floats(float(lo32), float(hi32), width=32))
    xs = draw(st.lists(st.one_of(elements), max_size=max_size))
    if xs and draw(st.booleans()):
        xs = xs + draw(st.lists(st.sampled_from(xs), max_size=10))        # duplicates
    return np.array(xs, dtype=np.float32)


@st.composite
def grid_and_values(draw):
    g = draw(grids())
    return g, draw(values_for(g))


def reference_stats(x: np.ndarray, g: Grid) -> ActivationStats:
    """The definition, in exact rational arithmetic: bin k is [lo + k w, lo + (k+1) w)."""
    counts = np.zeros(g.bins, dtype=np.int64)
    below = above = 0
    lo, w = Fraction(g.lo), (Fraction(g.hi) - Fraction(g.lo)) / g.bins
    for v in x.tolist():
        if v == -math.inf or (math.isfinite(v) and Fraction(v) < lo):
            below += 1
        elif v == math.inf or Fraction(v) >= lo + g.bins * w:
            above += 1
        else:
            counts[math.floor((Fraction(v) - lo) / w)] += 1
    mn = float(x.min()) if x.size else math.inf
    mx = float(x.max()) if x.size else -math.inf
    return ActivationStats(g, counts, below, above, mn, mx, x.size)


def split(draw, x: np.ndarray) -> list[np.ndarray]:
    cuts = sorted(draw(st.lists(st.integers(0, x.size), max_size=5)))
    parts = np.split(x, cuts)
    order = draw(st.permutations(range(len(parts))))
    return [parts[i] for i in order]


@SETTINGS
@given(gv=grid_and_values())
def test_binning_is_the_exact_definition(gv):
    g, x = gv
    assert observe(x, g) == reference_stats(x, g)


@SETTINGS
@given(gv=grid_and_values(), data=st.data())
def test_merge_of_any_partition_equals_pooled(gv, data):
    g, x = gv
    parts = split(data.draw, x)
    pooled = observe(x, g)
    merged = merge_all(observe(p, g) for p in parts)
    assert merged == pooled
    for f in ("counts", "below", "above", "min", "max", "n"):      # every field, spelled out
        assert np.array_equal(getattr(merged, f), getattr(pooled, f)), f
    assert merged.counts.dtype == np.int64 and merged.total == merged.n == x.size


@SETTINGS
@given(g=grids(), data=st.data())
def test_merge_is_associative_and_commutative(g, data):
    a, b, c = (observe(data.draw(values_for(g, 20)), g) for _ in range(3))
    assert merge(a, b) == merge(b, a)
    assert merge(a, merge(b, c)) == merge(merge(a, b), c) == merge_all([c, a, b])


@SETTINGS
@given(gv=grid_and_values(), factor=st.sampled_from([2, 4, 8]), data=st.data())
def test_widen_is_exact(gv, factor, data):
    g, x = gv
    finite = x[np.isfinite(x)]
    cover = None
    if finite.size and data.draw(st.booleans()):
        cover = (float(finite.min()), float(finite.max()))
    new = g.coarsen(factor, cover)
    assert new.bins == g.bins and new.lo <= g.lo and new.hi >= g.hi
    assert set(g.edges()) >= {e for e in new.edges() if g.lo <= e <= g.hi}
    if cover:
        assert new.lo <= cover[0] and cover[1] <= new.hi
    w = widen(observe(x, g), factor, cover)
    assert w.grid == new and w.n == x.size and w.total == x.size
    x64 = x.astype(np.float64)         # compare exactly: NumPy 2 would round lo/hi to float32
    inside = x[(x64 >= g.lo) & (x64 < g.hi)]
    assert widen(observe(inside, g), factor, cover) == observe(inside, new)
    direct = observe(x, new)           # outside values stay unplaced: never invented in a bin
    assert np.all(w.counts <= direct.counts)
    assert (w.min, w.max) == (direct.min, direct.max)


def test_widen_rules():
    g = grid_from_absmax([1.0], 8)
    s = observe(np.array([-0.9, 0.1, 0.3, 5.0], dtype=np.float32), g)
    w = widen(s, 2)
    assert w.grid.width == 2 * g.width and w.above == 1 and w.counts.sum() == 3
    with pytest.raises(ValueError, match="power of two"):
        widen(s, 3)
    assert widen(s, cover=(s.min, s.max)).grid.hi >= 5.0


def test_nan_is_rejected_with_a_count():
    g = grid_from_absmax([1.0], 16)
    x = np.array([0.1, np.nan, 0.2, np.nan], dtype=np.float32)
    with pytest.raises(ValueError, match="2 NaN"):
        observe(x, g)
    with pytest.raises(ValueError, match="NaN"):
        channel_absmax(x.reshape(2, 2))


@pytest.mark.parametrize("other,field", [((-2.0, 2.0, 16), "lo"), ((-1.0, 1.0, 8), "bins")])
def test_grid_mismatch_is_rejected(other, field):
    a = ActivationStats.empty(-1.0, 1.0, 16)
    with pytest.raises(ValueError, match=field):
        merge(a, ActivationStats.empty(*other))
    with pytest.raises(ValueError, match=field):
        merge_all([a, a, ActivationStats.empty(*other)])


def test_unaligned_grid_is_rejected_and_snap_fixes_it():
    with pytest.raises(ValueError, match="Grid.snap"):
        Grid(-0.1, 0.1, 256)
    g = Grid.snap(-0.1, 0.37, 256)
    assert g.lo <= -0.1 and g.hi >= 0.37 and g.width < 1.01 * 0.47 / 256


def test_torch_and_numpy_agree_and_chunks_do_not_matter(monkeypatch):
    x = torch.randn(64, 48) * 3
    x[0, 0] = float("inf")
    g = grid_from_absmax([4.0], 32)
    ref = observe(x.numpy(), g)
    assert observe(x, g) == ref == observe(x.to(torch.float64).numpy(), g)
    monkeypatch.setattr(stats_mod, "_CHUNK", 7)
    assert observe(x, g) == ref
    assert observe(x.to(torch.bfloat16), g).n == x.numel()


def test_empty():
    g = grid_from_absmax([1.0], 8)
    e = observe(np.array([], dtype=np.float32), g)
    assert e == ActivationStats.empty(g.lo, g.hi, g.bins) and e.n == 0 and e.min == math.inf
    s = observe(np.array([0.5]), g)
    assert merge(e, s) == s


@SETTINGS
@given(gv=grid_and_values())
def test_arrays_round_trip(gv):
    g, x = gv
    s = observe(x, g)
    arrs = s.to_arrays()
    assert {k: v.dtype for k, v in arrs.items()} == {
        "lo_hi": np.float64, "counts": np.int64, "below_above": np.int64, "min_max": np.float64,
        "n": np.int64}
    assert ActivationStats.from_arrays(arrs) == s
    small = dict(arrs, counts=arrs["counts"].astype(np.uint32))     # a smaller exact wire dtype
    assert ActivationStats.from_arrays(small) == s


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("n"), "missing"),
    (lambda d: d.update(extra=np.zeros(1)), "unexpected"),
    (lambda d: d.update(counts=d["counts"].astype(np.float32)), "counts must be an integer"),
    (lambda d: d.update(counts=d["counts"][:-1]), "not aligned|counts"),
    (lambda d: d.update(lo_hi=np.zeros(3)), "lo_hi has shape"),
    (lambda d: d.update(n=np.array(99)), "n is 99"),
    (lambda d: d.update(below_above=np.array([-1, 1])), "negative"),
    (lambda d: d.update(min_max=np.array([0.9, 0.95])), "min"),
    (lambda d: d.update(min_max=np.array([-0.9, np.nan])), "NaN"),
])
def test_from_arrays_validates(change, match):
    g = grid_from_absmax([1.0], 8)
    d = observe(np.array([-0.9, 0.1, 0.3, 0.31], dtype=np.float32), g).to_arrays()
    change(d)
    with pytest.raises(ValueError, match=match):
        ActivationStats.from_arrays(d)


def test_needs_widening():
    g = grid_from_absmax([1.0], 8)
    s = observe(np.array([0.0] * 98 + [5.0, -5.0], dtype=np.float32), g)
    assert needs_widening(s, 0.01) and not needs_widening(s, 0.02)
    assert not needs_widening(ActivationStats.empty(g.lo, g.hi, g.bins), 0.0)


def test_grid_from_absmax_is_robust():
    reports = [1.0] * 20 + [1e6]                       # one freak or poisoned client
    g = grid_from_absmax(reports, 256, margin=1.25, quantile=0.9)
    assert g.hi >= 1.25 and g.hi < 1.26 and g.lo == -g.hi and g.bins == 256
    assert 0.0 in set(g.edges())                       # zero is an edge of a symmetric grid
    pos = grid_from_absmax([2.0, 3.0], 100, nonnegative=True, quantile=1.0)
    assert pos.lo == 0.0 and pos.hi >= 3.75
    assert grid_from_absmax([0.0, 0.0], 16).hi > 0     # a dead activation still gets a grid
    with pytest.raises(ValueError):
        grid_from_absmax([1.0, float("nan")], 16)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7)),
       axis=st.sampled_from([-1, 0, 1]), seed=st.integers(0, 2**16), data=st.data())
def test_channel_absmax_merge_equals_pooled(shape, axis, seed, data):
    x = np.random.default_rng(seed).standard_cauchy(shape).astype(np.float32)
    batch = 1 if axis == 0 else 0                      # split along an axis other than the channel's
    cuts = sorted(data.draw(st.lists(st.integers(0, shape[batch]), max_size=3)))
    parts = np.split(x, cuts, axis=batch)
    merged = channel_absmax(parts[0], axis)
    for p in parts[1:]:
        merged = merge_absmax(merged, channel_absmax(p, axis))
    pooled = channel_absmax(x, axis)
    assert merged.dtype == np.float32 and np.array_equal(merged, pooled)
    assert np.array_equal(pooled, np.abs(np.moveaxis(x, axis, -1)).reshape(-1, x.shape[axis]).max(0))
    with pytest.raises(ValueError, match="shapes differ"):
        merge_absmax(pooled, np.zeros(pooled.size + 1, dtype=np.float32))

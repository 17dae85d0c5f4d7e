"""Central calibration pipeline: statistics merged across data holders give the pooled result."""

import numpy as np
import pytest
import torch

from quant.calibrate import CalibratorConfig
from quant.instrument import QuantConfig, fingerprint, quantize_, set_mode, set_qparams
from quant.ptq import (absmax_per_channel, activation_qparams, activation_specs, calibrate_activations,
                       calibration_stats, collect_stats, grids_for, scout_ranges)
from quant.qparams import QParams
from quant.stats import merge_all
from simulation.models import tiny_llama


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(seed=3)
    quantize_(m, QuantConfig())
    return m


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (n, 24), generator=g)


def test_statistics_of_parts_merge_to_the_pooled_calibration(model):
    batches = [_ids(2, s) for s in range(6)]
    grids = grids_for(scout_ranges(model, batches), bins=128)
    pooled = collect_stats(model, batches, grids)
    parts = [collect_stats(model, batches[i:i + 2], grids) for i in (0, 2, 4)]
    merged = {k: merge_all(p[k] for p in reversed(parts)) for k in pooled}
    assert all(merged[k] == pooled[k] for k in pooled)
    specs = activation_specs(model)
    for method in ("minmax", "percentile", "mse", "entropy"):
        cfg = CalibratorConfig(method=method)
        a, b = activation_qparams(pooled, specs, cfg), activation_qparams(merged, specs, cfg)
        for k in a:
            assert a[k].scale == b[k].scale and a[k].zero_point == b[k].zero_point


def test_scouted_ranges_cover_what_the_model_sees(model):
    batches = [_ids(2, 7)]
    ranges = scout_ranges(model, batches)
    assert set(ranges) == set(activation_specs(model))
    grids = grids_for(ranges, bins=64)
    stats = collect_stats(model, batches, grids)
    for k, st in stats.items():
        assert st.below == 0 and st.above == 0  # the grid holds every scouted value
        assert st.min == pytest.approx(ranges[k][0]) and st.max == pytest.approx(ranges[k][1])


def test_calibrated_activations_quantize_close_to_float(model):
    batches = [_ids(2, s) for s in range(3)]
    set_mode(model, "float", "activations")
    with torch.no_grad():
        ref = model(input_ids=batches[0]).logits
    stats = collect_stats(model, batches, grids_for(scout_ranges(model, batches), bins=256))
    points = activation_qparams(stats, activation_specs(model), CalibratorConfig(method="minmax"))
    set_qparams(model, QParams(points, model=fingerprint(model)))
    set_mode(model, "quant", "activations")
    with torch.no_grad():
        out = model(input_ids=batches[0]).logits
    set_mode(model, "float", "activations")
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05  # quantized (not identical) yet close



def test_calibrate_activations_is_the_spelled_out_recipe_bit_for_bit(model):
    """scout -> grids -> statistics -> activation_qparams, as callers used to write it out."""
    batches = [_ids(2, s) for s in range(4)]
    set_mode(model, "float", "activations")
    with torch.no_grad():
        stats = collect_stats(model, batches, grids_for(scout_ranges(model, batches), 96))
    calls = []
    got_stats = calibration_stats(model, iter(batches), 96, on_batch=lambda: calls.append(1))
    assert len(calls) == 2 * len(batches)                  # both passes, every batch
    assert list(got_stats) == list(stats) and all(got_stats[k] == stats[k] for k in stats)
    for method in ("minmax", "mse"):
        cfg = CalibratorConfig(method=method)
        want = activation_qparams(stats, activation_specs(model), cfg)
        got = calibrate_activations(model, batches, 96, cfg)
        assert list(got) == list(want)
        for k, p in want.items():
            assert got[k].spec == p.spec
            for a, b in ((got[k].scale, p.scale), (got[k].zero_point, p.zero_point)):
                a, b = np.asarray(a), np.asarray(b)
                assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

def test_per_channel_absmax_matches_the_tensors(model):
    seen = {}
    from quant.instrument import capture_inputs
    key = "model.layers.0.mlp.down_proj:input"
    with capture_inputs(model, lambda k, x: seen.setdefault(k, []).append(x.abs().amax(dim=(0, 1))), [key]):
        with torch.no_grad():
            model(input_ids=_ids(2, 1))
            model(input_ids=_ids(2, 2))
    got = absmax_per_channel(model, [_ids(2, 1), _ids(2, 2)], [key])[key]
    np.testing.assert_array_equal(got, torch.maximum(*seen[key]).numpy())

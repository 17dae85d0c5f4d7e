"""Post-training calibration of an instrumented torch model: scout, collect, calibrate.

The same three steps a federation runs (design.md section 4), here on one process's batches:
scouting gives each activation point its observed range, which fixes the histogram grid; a second
pass collects ``ActivationStats`` on that grid; the calibrator turns each histogram into a range and
``range_to_qparams`` into ``(s, z)``. ``calibrate_activations`` is the whole recipe in one call
(``calibration_stats`` its first two steps). The statistics of several data holders can be merged before
the last step (``quant.stats.merge_all``), which is what makes federated calibration equal to
central calibration on the pooled data.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from quant.affine import range_to_qparams
from quant.calibrate import CalibratorConfig, calibrate
from quant.instrument import capture_inputs, quant_points
from quant.qparams import PointParams
from quant.spec import QuantSpec
from quant.stats import ActivationStats, Grid, observe

Batches = Iterable[torch.Tensor]


def _run(model: nn.Module, batches: Batches, on_batch: Callable[[], None] | None) -> None:
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
            if on_batch:
                on_batch()


def scout_ranges(model: nn.Module, batches: Batches, keys: list[str] | None = None,
                 on_batch: Callable[[], None] | None = None) -> dict[str, tuple[float, float]]:
    """Observed (min, max) of every activation point over ``batches``."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def see(key: str, x: torch.Tensor) -> None:
        mn, mx = torch.aminmax(x.detach())
        lo[key] = min(lo.get(key, math.inf), float(mn))
        hi[key] = max(hi.get(key, -math.inf), float(mx))

    with capture_inputs(model, see, keys):
        _run(model, batches, on_batch)
    return {k: (lo[k], hi[k]) for k in lo}


def grids_for(ranges: dict[str, tuple[float, float]], bins: int, margin: float = 1.0) -> dict[str, Grid]:
    """An aligned histogram grid per point around its scouted range (widened by ``margin``),
    always containing 0 so that the calibrated range can too."""
    grids = {}
    for key, (lo, hi) in ranges.items():
        lo, hi = min(lo, 0.0) * margin, max(hi, 0.0) * margin
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{key}: scouted range [{lo}, {hi}] is not finite")
        grids[key] = Grid.snap(lo, hi if hi > lo else lo + 1e-6, bins)
    return grids


def collect_stats(model: nn.Module, batches: Batches, grids: dict[str, Grid],
                  on_batch: Callable[[], None] | None = None) -> dict[str, ActivationStats]:
    """``ActivationStats`` of every point in ``grids``, merged batch by batch (memory stays bounded)."""
    from quant.stats import merge

    stats: dict[str, ActivationStats] = {}

    def see(key: str, x: torch.Tensor) -> None:
        s = observe(x, grids[key])
        stats[key] = merge(stats[key], s) if key in stats else s

    with capture_inputs(model, see, list(grids)):
        _run(model, batches, on_batch)
    return stats


def activation_qparams(stats: dict[str, ActivationStats], specs: dict[str, QuantSpec],
                       config: CalibratorConfig) -> dict[str, PointParams]:
    """Pure: a calibrated (s, z) per activation point from (merged) statistics."""
    out = {}
    for key, st in stats.items():
        spec = specs[key]
        lo, hi = calibrate(st, spec, config)
        s, z = range_to_qparams(lo, hi, spec)
        out[key] = PointParams(spec, s, z)
    return out


def activation_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """The spec of every activation point of an instrumented model."""
    return {k: q.spec for k, q in quant_points(model).items() if q.kind == "activations"}


def calibration_stats(model: nn.Module, batches: Batches, bins: int, *,
                      on_batch: Callable[[], None] | None = None) -> dict[str, ActivationStats]:
    """What a calibrator runs on, from one holder's batches: scout every activation point's range,
    fix a ``bins`` grid around it (``grids_for``), collect ``ActivationStats`` on that grid. Two
    passes over ``batches`` (a generator is read into a list first); ``on_batch`` hears every batch
    of both. The points see what the model's modes give them: put the activations in float mode
    first to calibrate on the float model's ranges."""
    batches = list(batches)
    with torch.no_grad():
        grids = grids_for(scout_ranges(model, batches, on_batch=on_batch), bins)
        return collect_stats(model, batches, grids, on_batch=on_batch)


def calibrate_activations(model: nn.Module, batches: Batches, bins: int, calibrator: CalibratorConfig,
                          *, on_batch: Callable[[], None] | None = None) -> dict[str, PointParams]:
    """Central post-training calibration in one call, ``(s, z)`` per activation point:
    ``calibration_stats``, then ``activation_qparams`` with the points' specs. To compare several
    calibrators on the same data, take ``calibration_stats`` once and run ``activation_qparams``
    per calibrator."""
    stats = calibration_stats(model, batches, bins, on_batch=on_batch)
    return activation_qparams(stats, activation_specs(model), calibrator)


def absmax_per_channel(model: nn.Module, batches: Batches, keys: list[str] | None = None
                       ) -> dict[str, np.ndarray]:
    """Per-input-channel max |x| of every activation point (SmoothQuant's statistic; merge by max)."""
    from quant.stats import channel_absmax, merge_absmax

    out: dict[str, np.ndarray] = {}

    def see(key: str, x: torch.Tensor) -> None:
        m = channel_absmax(x, axis=-1)
        out[key] = merge_absmax(out[key], m) if key in out else m

    with capture_inputs(model, see, keys):
        _run(model, batches, None)
    return out

"""Weight ranges that minimise the rounding error the activations will see, instead of min-max.

A Linear's output error from its quantized weight is ``(W - Q(W)) x``. With the input channels
uncorrelated, its expected square is ``sum_j E[x_j^2] (w_ij - q_ij)^2`` per output row: the diagonal
of GPTQ's Hessian (Frantar et al., ICLR 2023) weights each input column. ``weight_point`` searches,
per channel or per group, the clipping ratio of the min-max range that minimises that weighted error
(the clip search of AWQ, Lin et al., MLSys 2024; llama.cpp's importance matrix, ``imatrix``, is the
same per-column second moment). ``importance`` None weighs every column alike (plain MSE: no data).

The statistic is a sum over tokens of ``x_j^2`` per input channel, so a fleet's is the sum of its
clients' (federated equals centralized), and one vector per Linear input is all a client sends (the
scouting round's ``sqsum``, merged by ``server.aggregate.merge_importance`` into
``QParams.importance``; ``quant.smoothing.smoothed_weight_point`` ranges a weight with it). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from quant.affine import range_to_qparams, tensor_range
from quant.qparams import PointParams
from quant.spec import QuantSpec

RATIOS = np.linspace(0.5, 1.0, 51)      # the min-max range shrunk by these factors (1.0: min-max itself)
ROWS = 64                               # output rows searched at a time


def weighted_rounding_error(w, scale, zero_point, spec: QuantSpec, importance=None) -> np.ndarray:
    """``sum_j h_j (w_j - dq(q(w_j)))^2`` per channel or group of a weight (out, in), with ``h``
    the per-input-column ``importance`` (ones when None). Shape: ``spec.param_shape(w.shape)``."""
    wg, hg = _grouped(np.asarray(w, np.float32), spec, importance)
    s = np.asarray(scale, np.float32).reshape(wg.shape[:2])[..., None]
    z = np.asarray(zero_point).astype(np.float32).reshape(wg.shape[:2])[..., None]
    q = np.clip(np.rint(wg / s) + z, spec.qmin, spec.qmax)
    err = (hg * ((q - z) * s - wg) ** 2).sum(-1, dtype=np.float64)
    return err.reshape(spec.param_shape(np.shape(w)))


def weight_point(w, spec: QuantSpec, importance=None, ratios=RATIOS) -> PointParams:
    """The weight point whose range, per channel or group, is the min-max range times the ratio of
    ``ratios`` with the least weighted rounding error (``weighted_rounding_error``). Ratio 1.0 is
    in the default grid, so the result is never worse than min-max on that error."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"a Linear weight is (out, in), got shape {w.shape}")
    if spec.granularity != "per_tensor" and w.shape[0] > ROWS:
        # rows are ranged independently: a block of them at a time keeps the 51 passes in cache
        # and the temporaries small (the same bits: each channel's or group's sum is its own)
        parts = [weight_point(w[i:i + ROWS], spec, importance, ratios) for i in range(0, w.shape[0], ROWS)]
        return PointParams(spec, np.concatenate([p.scale for p in parts]),
                           np.concatenate([p.zero_point for p in parts]))
    if importance is not None:
        importance = np.asarray(importance, np.float64)
        if importance.shape != (w.shape[1],) or not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise ValueError(f"importance must be {w.shape[1]} finite non-negative numbers, got shape "
                             f"{importance.shape}")
    lo, hi = tensor_range(w, spec)
    best_err = best_s = best_z = None
    for r in np.asarray(ratios, np.float64):
        if not 0 < r <= 1:
            raise ValueError(f"ratios must be in (0, 1], got {r}")
        s, z = range_to_qparams(lo * r, hi * r, spec)
        err = weighted_rounding_error(w, s, z, spec, importance)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return PointParams(spec, best_s.astype(np.float32), best_z.astype(spec.numpy_dtype))


def _grouped(w: np.ndarray, spec: QuantSpec, importance) -> tuple[np.ndarray, np.ndarray]:
    """``w`` as (rows, groups, elements) and the importance broadcast to it."""
    out, cols = w.shape
    h = np.ones(cols, np.float32) if importance is None else np.asarray(importance, np.float32)
    if spec.granularity == "per_group":
        if spec.resolved_axis(2) != 1:
            raise ValueError("per-group weights are grouped along the input axis (axis 1)")
        g = spec.group_size
        return w.reshape(out, cols // g, g), np.broadcast_to(h.reshape(1, cols // g, g), (out, cols // g, g))
    if spec.granularity == "per_channel":
        if spec.resolved_axis(2) != 0:
            raise ValueError("per-channel weights have their channels on the output axis (axis 0)")
        return w.reshape(out, 1, cols), np.broadcast_to(h.reshape(1, 1, cols), (out, 1, cols))
    return w.reshape(1, 1, -1), np.broadcast_to(np.tile(h, out).reshape(1, 1, -1), (1, 1, out * cols))

"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): per-input-channel factors ``m`` that move activation outliers
into the weights. A smoothed Linear computes ``(x / m) @ (W * m)^T``, the same float product, and
quantizes ``x / m`` and ``W * m`` (``quant.instrument.QuantLinear``, the Div node of
``quant.qdq``).

Everything here is a pure function of float32 arrays, so the server and every device derive the
same bits: the server computes the factors from the fleet's merged per-channel abs-max and the
weights; a device that receives new factors folds them into its own copy of the weights and
re-derives those weights' min-max qparams (``smoothed_weight_point``) instead of downloading them.
"""

from __future__ import annotations

import numpy as np

from quant.affine import range_to_qparams, tensor_range
from quant.qparams import PointParams
from quant.rotation import rotate
from quant.spec import QuantSpec
from quant.weight_ranges import weight_point


def smoothing_factors(act_absmax, weight, alpha: float = 0.5,
                      bounds: tuple[float, float] = (1e-5, 1e5)) -> np.ndarray:
    """``m_j = max|X_j|^a / max|W_j|^(1-a)`` (eq. 4 of the paper) for one Linear, from the
    per-input-channel abs-max of its input and its float weight ``(out, in)``; float32.

    At ``a = 0.5`` both sides of each channel end up with the same range; larger ``a`` moves more
    of the outliers into the weight. Channels never seen (abs-max 0) or with an all-zero weight
    column keep ``m = 1``; factors are clipped to ``bounds`` so that a near-dead channel cannot
    blow up a weight column."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w = np.abs(np.asarray(weight, dtype=np.float64)).max(axis=0)
    x = np.asarray(act_absmax, dtype=np.float64)
    if x.shape != w.shape:
        raise ValueError(f"{x.shape[0] if x.ndim else x.size} activation channels, the weight has {w.shape[0]} inputs")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("activation abs-max must be finite and non-negative")
    live = (x > 0) & (w > 0)
    m = np.ones_like(x)
    m[live] = x[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(m, *bounds).astype(np.float32)


def fold_weight(weight, factors=None, rotation: int = 0) -> np.ndarray:
    """``W * m`` (columns scaled) in float32: what a smoothed Linear quantizes (``factors`` None:
    an unsmoothed one, ``W``); a rotated Linear's (per token or static) rotated by ``quant.rotation`` when
    ``rotation`` is a block (``W * m`` then ``R``)."""
    w = np.asarray(weight, dtype=np.float32)
    if factors is not None:
        w = w * np.asarray(factors, dtype=np.float32)
    return rotate(w, rotation) if rotation else w


def smoothed_weight_point(weight, factors, spec: QuantSpec, rotation: int = 0, importance=None) -> PointParams:
    """Min-max qparams of ``W * m`` (rotated: ``fold_weight``) at the spec's granularity: the
    weight point of a smoothed Linear (``QuantLinear.calibrate_weight`` derives the same from the
    same float32 product). With ``importance`` (``QParams.importance``: the fleet's ``E[x_j^2]``
    of the float input), the range with the least rounding error weighted per column
    (``quant.weight_ranges.weight_point``): the columns of ``W * m`` see ``x / m``, so each weighs
    ``E[x_j^2] / m_j^2``. A rotated Linear's columns see ``(x / m) R``, whose channels mix the input's:
    its importance is given in those channels as it is (``server.rounds.importance_qparams`` gives
    ones, plain MSE: the rotation evens the channels out)."""
    w = fold_weight(weight, factors, rotation)
    if importance is None:
        s, z = range_to_qparams(*tensor_range(w, spec), spec)
        return PointParams(spec, s, z)
    h = np.asarray(importance, dtype=np.float32)
    if factors is not None and not rotation:
        h = h / np.square(np.asarray(factors, dtype=np.float32))
    return weight_point(w, spec, h)


def smoothed_absmax(channel_absmax, factors) -> float:
    """``max_j |x_j / m_j|`` from the per-channel abs-max of ``x``: exactly the abs-max the device
    would see after dividing by ``m`` in float32 (rounding is monotone, so the max commutes)."""
    a = np.asarray(channel_absmax, dtype=np.float32) / np.asarray(factors, dtype=np.float32)
    return float(a.max()) if a.size else 0.0

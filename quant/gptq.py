"""GPTQ's rounding of a Linear weight from its input's second moment (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023).

Rounding each weight to its nearest grid point (what a device does from a QParams weight point)
minimises the error in the weight; GPTQ minimises the error in the Linear's output,
``tr((W - Q) H (W - Q)^T)`` with ``H = sum_t x_t x_t^T`` over the input's tokens: it rounds one
input column at a time and moves the error onto the columns not yet rounded, through the inverse
of ``H`` (Optimal Brain Surgeon's update). The codes differ from round-to-nearest, so a QParams
weight point (scale and zero-point) cannot carry them: what GPTQ gives a device is its dequantized
weight, which lies on the point's grid, or its codes (``gptq_codes``, which a QParams carries:
``QParams.codes``).

``H`` is a sum over tokens, so a fleet's is the sum of its clients' (federated equals centralized),
as for the diagonal that ranks weight ranges (``quant.weight_ranges``); its size is ``in^2`` per
input tensor. Groups (``per_group`` specs) take their range when GPTQ reaches them, from the
columns as the earlier errors left them (the paper's grouping), with the least plain rounding error
(``quant.weight_ranges.weight_point``). A device's Linear quantizes its input smoothed and rotated,
``x' = (x / m) R``; a fleet measures the float input ``x`` once for every Linear it feeds and the
server derives each Linear's ``H' = R^T diag(1/m) H diag(1/m) R`` (``linear_hessian``). Pure numpy,
float64.
"""

from __future__ import annotations

import numpy as np

from quant.qparams import PointParams
from quant.rotation import block_for, hadamard, signs
from quant.spec import QuantSpec
from quant.weight_ranges import weight_point

DAMP = 0.01         # the paper's dampening: this fraction of the mean diagonal added to H
BLOCK = 128         # columns rounded before their error moves to the rest (per_channel specs)


def gptq_weight(weight, hessian, spec: QuantSpec, damp: float = DAMP) -> tuple[np.ndarray, PointParams]:
    """GPTQ's dequantized ``weight`` (out, in) as float32 and its point (``spec``: per channel on
    the output axis, or in groups along the input axis), for the input second moment ``hessian``
    (in, in), symmetric positive semi-definite. Input channels with ``H_jj = 0`` (never seen) get
    weight 0. ValueError for shapes that do not match or an ``H`` that damping leaves singular."""
    codes, point = gptq_codes(weight, hessian, spec, damp)
    s = np.asarray(point.scale, np.float32)
    z = np.asarray(point.zero_point, np.int32)
    if spec.granularity == "per_group":
        s, z = np.repeat(s, spec.group_size, axis=1), np.repeat(z, spec.group_size, axis=1)
    else:
        s, z = s.reshape(-1, 1), z.reshape(-1, 1)
    return ((codes.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32), point


def gptq_codes(weight, hessian, spec: QuantSpec, damp: float = DAMP) -> tuple[np.ndarray, PointParams]:
    """``gptq_weight``'s integer codes (out, in) in the spec's container dtype, and its point: what
    ``QParams.codes`` carries to a device."""
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"a weight (out, in) and its input's (in, in) second moment, got {w.shape} and {h.shape}")
    if not np.all(np.isfinite(h)) or not np.all(np.isfinite(w)):
        raise ValueError("weight and second moment must be finite")
    if not 0 <= damp:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if spec.granularity == "per_group":
        if spec.resolved_axis(2) != 1:
            raise ValueError("per-group weights are grouped along the input axis (axis 1)")
        block = int(spec.group_size)
        if w.shape[1] % block:
            raise ValueError(f"{w.shape[1]} input columns are not whole groups of {block}")
    elif spec.granularity == "per_channel" and spec.resolved_axis(2) == 0:
        block = BLOCK
    else:
        raise ValueError(f"GPTQ rounds per-channel (axis 0) or per-group weights, got {spec.granularity}")
    cols = w.shape[1]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * float(np.mean(np.diag(h))) * np.eye(cols)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T     # upper: row i holds column i's update
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the second moment is not positive definite after damping {damp}: {e}") from None
    q = np.zeros(w.shape, np.int32)
    scales, zeros = [], []
    if spec.granularity == "per_channel":
        whole = weight_point(w.astype(np.float32), spec)
        s, z = whole.scale.reshape(-1, 1).astype(np.float64), whole.zero_point.reshape(-1, 1).astype(np.float64)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        part, err = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        if spec.granularity == "per_group":     # the group's range, from its columns as they are now
            pt = weight_point(part.astype(np.float32), spec)
            s, z = pt.scale.reshape(-1, 1).astype(np.float64), pt.zero_point.reshape(-1, 1).astype(np.float64)
            scales.append(pt.scale.reshape(-1, 1))
            zeros.append(pt.zero_point.reshape(-1, 1))
        # the device's own rounding of the point's float32 scale
        s32 = s.astype(np.float32).astype(np.float64)
        for i in range(i2 - i1):
            col = part[:, i:i + 1]
            code = np.clip(np.rint(col / s32) + z, spec.qmin, spec.qmax)
            rounded = (code - z) * s32
            q[:, i1 + i] = code[:, 0]
            e = (col - rounded) / u[i1 + i, i1 + i]
            part[:, i:] -= e @ u[i1 + i:i1 + i + 1, i1 + i:i2]
            err[:, i] = e[:, 0]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if spec.granularity == "per_group":
        point = PointParams(spec, np.concatenate(scales, 1).astype(np.float32),
                            np.concatenate(zeros, 1).astype(spec.numpy_dtype))
    else:
        point = whole
    return q.astype(spec.numpy_dtype), point


def linear_hessian(hessian, factors=None, rotation: int = 0) -> np.ndarray:
    """The second moment of a Linear's input as its graph quantizes it, ``x' = (x / m) R``
    (``quant.smoothing.fold_weight``'s twin: the weight is ``(W * m) R``), from that of the float
    input ``x``: ``R^T diag(1/m) H diag(1/m) R``, float64."""
    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"a second moment is square, got shape {h.shape}")
    if factors is not None:
        inv = 1.0 / np.asarray(factors, np.float32).astype(np.float64)
        if inv.shape != (h.shape[0],):
            raise ValueError(f"{inv.shape[0]} smoothing factors for a {h.shape[0]}-wide input")
        h = h * inv[:, None] * inv[None, :]
    n = h.shape[0]
    b = block_for(n, rotation) if rotation else 0
    if not b:
        return h
    d, hb = signs(n).astype(np.float64), hadamard(b)

    def right(a):       # a R along the last axis, in float64
        return ((a * d).reshape(*a.shape[:-1], n // b, b) @ hb).reshape(a.shape)

    return right(right(h).T).T

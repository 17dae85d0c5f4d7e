"""The affine map between real and integer values, for numpy arrays and torch tensors.

``q = saturate(round_half_to_even(x / s) + z)`` and ``x_hat = (q - z) * s``, exactly as ONNX
QuantizeLinear / DequantizeLinear compute it (the division in the input's float type, ties to even,
saturation to the storage type's range). Conformance with ``onnx.reference`` is tested bit for bit.
"""

from __future__ import annotations

import sys

import numpy as np

from quant.spec import SCALE_FLOOR, QuantSpec


def _is_torch(x) -> bool:
    # torch is imported only when a tensor comes in: the device path (scouting, statistics,
    # evaluation on ONNX Runtime) must not need it (design.md section 5).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_scale(scale) -> None:
    s = scale.detach().cpu().numpy() if _is_torch(scale) else np.asarray(scale)
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        bad = s[~(np.isfinite(s) & (s > 0))].ravel()[:3]
        raise ValueError(f"scale must be finite and positive, got {bad.tolist()}")


def broadcast_param(p, spec: QuantSpec, x_shape: tuple[int, ...]):
    """Expand a scale or zero-point of ``spec.param_shape(x_shape)`` so it broadcasts against x."""
    if spec.granularity == "per_tensor":
        return p
    axis = spec.resolved_axis(len(x_shape))
    if spec.granularity == "per_channel":
        shape = [1] * len(x_shape)
        shape[axis] = x_shape[axis]
        return p.reshape(shape)
    expected = spec.param_shape(x_shape)
    if tuple(p.shape) != expected:
        raise ValueError(f"per_group parameter has shape {tuple(p.shape)}, expected {expected}")
    if _is_torch(p):
        import torch
        return torch.repeat_interleave(p, spec.group_size, dim=axis)
    return np.repeat(p, spec.group_size, axis=axis)


def quantize(x, scale, zero_point, spec: QuantSpec):
    """Real to integer, ONNX QuantizeLinear semantics. Returns ``spec.numpy_dtype`` for numpy input,
    an integer tensor (int32, since torch lacks uint16) for torch input."""
    _check_scale(scale)
    if _is_torch(x):
        import torch
        s = broadcast_param(torch.as_tensor(scale, dtype=x.dtype, device=x.device), spec, x.shape)
        z = broadcast_param(torch.as_tensor(zero_point, device=x.device), spec, x.shape)
        q = torch.round(x / s).to(torch.float64) + z.to(torch.float64)
        return torch.clamp(torch.nan_to_num(q, nan=0.0), spec.qmin, spec.qmax).to(torch.int32)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    s = broadcast_param(np.asarray(scale, dtype=x.dtype), spec, x.shape)
    z = broadcast_param(np.asarray(zero_point), spec, x.shape)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        q = np.rint(x / s).astype(np.float64) + z.astype(np.float64)
    q = np.clip(np.nan_to_num(q, nan=0.0), spec.qmin, spec.qmax)
    return q.astype(spec.numpy_dtype)


def dequantize(q, scale, zero_point, spec: QuantSpec):
    """Integer to real, ONNX DequantizeLinear semantics: ``(q - z) * s`` in float32."""
    if _is_torch(q):
        import torch
        s = broadcast_param(torch.as_tensor(scale, dtype=torch.float32, device=q.device), spec, q.shape)
        z = broadcast_param(torch.as_tensor(zero_point, device=q.device), spec, q.shape)
        return (q.to(torch.int32) - z.to(torch.int32)).to(torch.float32) * s
    q = np.asarray(q)
    s = broadcast_param(np.asarray(scale, dtype=np.float32), spec, q.shape)
    z = broadcast_param(np.asarray(zero_point), spec, q.shape)
    return (q.astype(np.int32) - z.astype(np.int32)).astype(np.float32) * s


def fake_quant(x, scale, zero_point, spec: QuantSpec):
    """Quantize then dequantize: what the integer runtime computes, in float."""
    q = quantize(x, scale, zero_point, spec)
    out = dequantize(q, scale, zero_point, spec)
    return out.to(x.dtype) if _is_torch(x) else out


def range_to_qparams(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Map a real range ``[lo, hi]`` (scalars, or arrays of ``spec.param_shape``) to ``(s, z)``.

    The range is widened to contain 0 so that real zero (padding, masking) is exact. Asymmetric:
    ``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)`` clamped. Symmetric:
    ``s = max(|lo|, |hi|) / qmax_sym`` and z is the middle of the range. ``s >= SCALE_FLOOR``.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("range bounds must be finite")
    if np.any(lo > hi):
        raise ValueError("range has lo > hi")
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    if spec.symmetric:
        s = np.maximum(np.maximum(-lo, hi) / spec.qmax_symmetric, SCALE_FLOOR).astype(np.float32)
        z = np.full(s.shape, spec.symmetric_zero_point)
    else:
        s = np.maximum((hi - lo) / (spec.qmax - spec.qmin), SCALE_FLOOR).astype(np.float32)
        z = np.clip(np.rint(spec.qmin - lo / s.astype(np.float64)), spec.qmin, spec.qmax)
    return s, z.astype(spec.numpy_dtype)


def qparams_to_range(scale, zero_point, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """The real range a ``(s, z)`` pair represents: ``[(qmin - z) s, (qmax - z) s]``."""
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    return (spec.qmin - z) * s, (spec.qmax - z) * s


def tensor_range(x, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``x`` at the spec's granularity (the min-max range of a weight)."""
    x = x.detach().cpu().float().numpy() if _is_torch(x) else np.asarray(x, dtype=np.float32)
    if spec.granularity == "per_tensor":
        return np.asarray(x.min()), np.asarray(x.max())
    axis = spec.resolved_axis(x.ndim)
    if spec.granularity == "per_channel":
        other = tuple(i for i in range(x.ndim) if i != axis)
        return x.min(axis=other), x.max(axis=other)
    shape = spec.param_shape(x.shape)
    split = list(x.shape[:axis]) + [shape[axis], spec.group_size] + list(x.shape[axis + 1:])
    xg = x.reshape(split)
    return xg.min(axis=axis + 1), xg.max(axis=axis + 1)

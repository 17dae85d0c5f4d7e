"""Learned quantization ranges: LSQ (Esser et al., ICLR 2020) with the LSQ+ offset (Bhalgat et al.,
CVPR-W 2020).

The learnable parameters of a quantization point are ``log_s`` (the scale in log space, so it stays
positive and moves multiplicatively) and ``beta`` (a real-valued offset, LSQ+). With ``u = (x - beta)/s``

    x_hat = s * clamp(round(u), qmin, qmax) + beta,

which is the affine fake-quant of ``quant.affine`` when ``beta = -z s`` for an integer z. Rounding goes
through the straight-through estimator and the gradients of ``s`` and ``beta`` are multiplied by
``g = 1 / sqrt(N * Qp)`` (LSQ section 2.2): N is the number of elements of x per scale, Qp the
largest positive level. The integer zero-point is derived only at the end (``to_qparams``), never
averaged or learned as an integer (design.md section 4).

Numerics, so that the learned model agrees with the runtime bit for bit when z is an integer: ``x/s``
is computed in x's dtype as ONNX QuantizeLinear does, and ``-beta/s`` is split into an integer part k
and a fraction f, ``q = round_half_even(x/s + f) + k``. With f = 0 this is ONNX's
``round(x/s) + z`` (not ``round(x/s + z)``, which breaks ties differently for odd z). ``log_s`` and
``beta`` are float64 so that ``exp(log(s))`` gives back a float32 scale exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from quant.affine import broadcast_param
from quant.spec import SCALE_FLOOR, QuantSpec

# An offset within this many steps of an integer zero-point is that zero-point (float64 noise of
# beta = -z*s); it changes x_hat by at most 1e-9 * s and makes the forward match the runtime exactly.
_INTEGER_TOL = 1e-9


def positive_level(spec: QuantSpec) -> int:
    """Qp of LSQ: qmax, or qmax_symmetric for a symmetric spec."""
    return spec.qmax_symmetric if spec.symmetric else spec.qmax


def _split_offset(zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.round(zf)
    f = zf - k
    return k, torch.where(f.abs() <= _INTEGER_TOL, torch.zeros_like(f), f)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a full-size gradient to a broadcast parameter's shape."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _LSQ(torch.autograd.Function):
    """x_hat = s*clamp(round(u), n, p) + beta with the STE; gradients are LSQ's (eq. 3) and LSQ+'s:

    d/dx    = 1 if n <= u <= p else 0
    d/ds    = round(u) - u inside, n below, p above
    d/dbeta = 0 inside, 1 outside (clamped)

    and the s and beta gradients are multiplied by ``g``.
    """

    @staticmethod
    def forward(ctx, x, s, beta, qmin, qmax, g):
        s32 = s.to(x.dtype)
        v = x / s32                                    # as ONNX QuantizeLinear: in x's dtype
        zf = -beta / s                                  # float64
        k, f = _split_offset(zf)
        r = torch.round(v.to(torch.float64) + f)
        q = torch.clamp(torch.nan_to_num(r + k, nan=0.0), qmin, qmax)
        out = (q - zf).to(torch.float32) * s32.to(torch.float32)
        ctx.save_for_backward(x, s, beta)
        ctx.qrange, ctx.g = (qmin, qmax), g
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, s, beta = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        x64 = x.to(torch.float64)
        u = (x64 - beta) / s
        _, f = _split_offset(-beta / s)
        r = torch.round(x64 / s + f) - (x64 / s + f)  # round(u) - u, with the forward's tie rule
        below, above = u < qmin, u > qmax
        inside = ~(below | above)
        go = grad_out.to(torch.float64)
        grad_x = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, r, torch.where(below, float(qmin), float(qmax)))
            grad_s = _sum_to(go * ds * ctx.g, s.shape)
        if ctx.needs_input_grad[2]:
            grad_b = _sum_to(go * (~inside) * ctx.g, beta.shape)
        return grad_x, grad_s, grad_b, None, None, None


def lsq_fake_quant(x: torch.Tensor, log_s: torch.Tensor, beta: torch.Tensor | None,
                   spec: QuantSpec, grad_scale: float | None = None) -> torch.Tensor:
    """LSQ+ fake-quant of ``x`` with learnable ``log_s`` and ``beta`` of ``spec.param_shape(x.shape)``.

    For a symmetric spec ``beta`` is not learned: it is ``-z_sym * s`` (the argument is ignored and may
    be None), so the scale's gradient includes the offset's dependence on s. ``grad_scale`` defaults to
    LSQ's ``1/sqrt(N * Qp)``.
    """
    s = torch.exp(log_s).clamp_min(SCALE_FLOOR)
    if spec.symmetric:
        beta = -float(spec.symmetric_zero_point) * s
    elif beta is None:
        raise ValueError("an asymmetric spec needs beta")
    if grad_scale is None:
        n_per_scale = x.numel() / max(log_s.numel(), 1)
        grad_scale = 1.0 / math.sqrt(n_per_scale * positive_level(spec))
    s_b = broadcast_param(s, spec, tuple(x.shape))
    b_b = broadcast_param(beta, spec, tuple(x.shape))
    return _LSQ.apply(x, s_b, b_b, spec.qmin, spec.qmax, float(grad_scale))


def init_from_qparams(scale, zero_point, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_s, beta)`` as float64 tensors from an affine ``(s, z)``: ``beta = -z * s``."""
    s = torch.as_tensor(np.asarray(scale, dtype=np.float32), dtype=torch.float64)
    if not torch.all(torch.isfinite(s) & (s > 0)):
        raise ValueError("scale must be finite and positive")
    log_s = torch.log(s)
    z = torch.as_tensor(np.asarray(zero_point, dtype=np.float64))
    return log_s, -z * torch.exp(log_s)


def to_qparams(log_s, beta, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """The affine ``(s, z)`` a learned ``(log_s, beta)`` stands for: ``z = round(-beta/s)`` clamped
    (the design's "zero-points derived only at the end"); symmetric specs keep their fixed z."""
    log_s = torch.as_tensor(log_s).detach().to(torch.float64)
    s64 = torch.exp(log_s).clamp_min(SCALE_FLOOR)
    scale = s64.numpy().astype(np.float32)
    if spec.symmetric:
        z = np.full(scale.shape, spec.symmetric_zero_point)
    else:
        beta = torch.as_tensor(beta).detach().to(torch.float64)
        z = np.clip(np.rint((-beta / s64).numpy()), spec.qmin, spec.qmax)
    return scale, z.astype(spec.numpy_dtype)

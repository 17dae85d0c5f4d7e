"""Mixed precision 4/8/16: measure each point's sensitivity, then spend a bit budget on the most
sensitive ones (design.md section 3).

Sensitivity is the loss increase when one point alone is quantized at its low bit width, the rest of
the model in float (the per-layer probe of HAWQ-style and on-device LLM deployments, without the
Hessian). The plan is greedy: weights start at 4 bits (per group) and the ones with the largest
sensitivity per extra bit go to 8 while the numel-weighted average stays within the budget;
activations start at 8 bits and the most sensitive share goes to 16.

The fleet's estimate (``fit_sensitivity``, the client's ``plan`` job) replaces the one-at-a-time probe
with one backward pass per sequence: FIT (Zandonati et al., 2023, "FIT: A Metric for Model
Sensitivity"), the empirical-Fisher form of HAWQ-V2's Hessian-trace weighting (Dong et al., 2020):
a point's expected loss increase from a perturbation ``delta`` is about ``sum (g * delta)^2`` with
``g`` the loss gradient there. Its sums are additive over tokens and sequences, so a server that adds
the clients' sums holds the pooled estimate (federated == centralized).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quant.affine import range_to_qparams, tensor_range
from quant.spec import QuantSpec, activation_spec, weight_spec

if TYPE_CHECKING:     # torch only where a function needs it: the server imports MixedBudget
    import torch
    from torch import nn


class MixedBudget(BaseModel):
    """How many bits the plan may spend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    avg_weight_bits: float = Field(6.0, ge=4.0, le=8.0, description="numel-weighted mean weight bits")
    weight_group_size: int | None = Field(64, ge=2, description="4-bit group size; None: per channel")
    max_act16_share: float = Field(0.1, ge=0.0, le=1.0, description="share of activation points at 16 bits")


def sensitivity(model: "nn.Module", batches: Iterable, loss_fn: Callable[["nn.Module", object], float],
                keys: list[str], low_spec_for_key: Callable[[str], QuantSpec] | Mapping[str, QuantSpec]
                ) -> dict[str, float]:
    """Loss increase over float of quantizing each point of ``keys`` alone at its low spec.

    ``model`` must have been through ``instrument.quantize_``; its quantizers are restored on return.
    Weight qparams are min-max of the weights; activation qparams are min-max over ``batches``
    (gathered during the float pass), a deliberately plain calibrator: it ranks points, it does not
    produce their final ranges. ``loss_fn(model, batch)`` returns a float; the loss is the mean
    over batches, under ``torch.no_grad``.
    """
    import torch

    from quant.instrument import capture_inputs, quant_points

    batches = list(batches)
    points = quant_points(model)
    unknown = [k for k in keys if k not in points]
    if unknown:
        raise ValueError(f"not quantization points of this model: {unknown[:5]}")
    if any(q.mode == "learn" for q in points.values()):
        raise ValueError("sensitivity needs no point in learn mode; set_mode(model, 'quant') first")
    low = low_spec_for_key if callable(low_spec_for_key) else low_spec_for_key.__getitem__
    saved = {k: (q.spec, q.scale.clone(), q.zero_point.clone(), q.mode, q.calibrated)
             for k, q in points.items()}
    act_keys = [k for k in keys if points[k].kind == "activations"]
    lo = {k: np.inf for k in act_keys}
    hi = {k: -np.inf for k in act_keys}

    def track(key: str, x) -> None:
        lo[key] = min(lo[key], float(x.min()))
        hi[key] = max(hi[key], float(x.max()))

    def mean_loss() -> float:
        return float(np.mean([float(loss_fn(model, b)) for b in batches]))

    try:
        for q in points.values():
            q.mode = "float"
        with torch.no_grad():
            with capture_inputs(model, track, act_keys):
                base = mean_loss()
            result = {}
            for key in keys:
                q, spec = points[key], low(key)
                if q.kind == "weights":
                    ql = model.get_submodule(key.rpartition(":")[0])
                    s, z = range_to_qparams(*tensor_range(ql.effective_weight(), spec), spec)
                else:
                    s, z = range_to_qparams(lo[key], hi[key], spec)
                q.set_qparams(s, z, spec)
                q.mode = "quant"
                result[key] = mean_loss() - base
                q.mode = "float"
    finally:
        for k, (spec, s, z, mode, calibrated) in saved.items():
            q = points[k]
            q.spec, q.scale, q.zero_point, q.mode, q.calibrated = spec, s, z, mode, calibrated
    return result


def fit_term(grad, delta, chunk: int = 1 << 20) -> float:
    """``sum (grad * delta)^2`` in float64: one batch's FIT contribution of one point (``grad``
    the loss gradient at the point's tensor, ``delta`` the quantization error there). Summed
    ``chunk`` elements at a time: a float64 copy of a whole tied lm_head (28M weights on SmolLM2)
    and its products were the plan job's largest transient, about 0.9 GB."""
    import torch

    g = torch.as_tensor(grad)
    d = torch.as_tensor(delta)
    if g.shape != d.shape:
        raise ValueError(f"gradient shape {tuple(g.shape)} != error shape {tuple(d.shape)}")
    g, d = g.reshape(-1), d.reshape(-1)
    total = 0.0
    for i in range(0, g.numel(), chunk):
        total += float(((g[i:i + chunk].double() * d[i:i + chunk].double()) ** 2).sum())
    return total


def weight_plan_error(w, spec_low: QuantSpec, spec_high: QuantSpec) -> torch.Tensor:
    """``Q_low(W) - Q_high(W)`` with each spec's min-max qparams of ``w`` (what a device derives from
    its weights): how much the weight moves when it stays at the low spec instead of the high one."""
    import torch

    from quant.affine import fake_quant

    w = torch.as_tensor(w).detach().float()
    out = []
    for spec in (spec_low, spec_high):
        s, z = range_to_qparams(*tensor_range(w, spec), spec)
        out.append(fake_quant(w, torch.as_tensor(s), torch.as_tensor(z), spec))
    return out[0] - out[1]


def activation_plan_error(x, scale, zero_point, spec: QuantSpec) -> torch.Tensor:
    """``Q(x) - x`` at ``(scale, zero_point, spec)``: the error of keeping an activation at its
    low spec (its 16-bit error is ~256x smaller and left out)."""
    import torch

    from quant.affine import fake_quant

    x = torch.as_tensor(x).detach().float()
    return fake_quant(x, torch.as_tensor(scale), torch.as_tensor(zero_point), spec) - x


def robust_sensitivity(per_client: list[Mapping[str, float]], trim: float) -> dict[str, float]:
    """A fleet's sensitivity no minority can steer: each client's sums as shares of its own total
    (a lying phone's scale buys nothing), then the coordinate-wise trimmed mean of the shares
    (Yin et al., ICML 2018): a point one client alone calls sensitive is trimmed away."""
    import math

    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    keys = sorted({k for r in per_client for k in r})
    if not per_client or not keys:
        return {}
    m = np.array([[float(r.get(k, 0.0)) for k in keys] for r in per_client], dtype=np.float64)
    tot = m.sum(axis=1, keepdims=True)
    shares = np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)
    n = len(per_client)
    b = math.floor(trim * n)
    return dict(zip(keys, np.sort(shares, axis=0)[b:n - b].mean(axis=0).tolist()))


def plan_mixed_precision(weight_sens: Mapping[str, float], act_sens: Mapping[str, float],
                         weight_numels: Mapping[str, int], budget: MixedBudget) -> dict[str, QuantSpec]:
    """Overrides for ``QuantConfig``: a spec for every key of ``weight_sens`` and ``act_sens``.

    Weights: all at 4 bits, then promoted to 8 in decreasing order of sensitivity per extra bit
    (``sens / (4 * numel)``), each one only if the numel-weighted average stays <= the budget
    (greedy knapsack). Activations: all at 8 bits, then the most sensitive (positive sensitivity
    only) go to 16, at most ``floor(max_act16_share * n)`` of them. Pure: no torch, no model.
    """
    missing = [k for k in weight_sens if k not in weight_numels]
    if missing:
        raise ValueError(f"no numel for weight points {missing[:5]}")
    w4 = weight_spec(4, group_size=budget.weight_group_size)
    w8 = weight_spec(8)
    plan: dict[str, QuantSpec] = {k: w4 for k in weight_sens}
    total = sum(int(weight_numels[k]) for k in weight_sens)
    allowed_extra = (budget.avg_weight_bits - 4.0) * total  # extra bit-elements we may spend
    spent = 0
    order = sorted(weight_sens, key=lambda k: (-weight_sens[k] / (4.0 * weight_numels[k]), k))
    for k in order:
        extra = 4 * int(weight_numels[k])
        if spent + extra <= allowed_extra:
            plan[k] = w8
            spent += extra

    a8, a16 = activation_spec(8), activation_spec(16)
    plan.update({k: a8 for k in act_sens})
    n16 = int(np.floor(budget.max_act16_share * len(act_sens) + 1e-9))
    ranked = sorted((k for k in act_sens if act_sens[k] > 0), key=lambda k: (-act_sens[k], k))
    plan.update({k: a16 for k in ranked[:n16]})
    return plan


def average_weight_bits(plan: Mapping[str, QuantSpec], weight_numels: Mapping[str, int]) -> float:
    """Numel-weighted mean bit width of the weight points of ``plan``."""
    keys = [k for k in plan if k.endswith(":weight")]
    total = sum(int(weight_numels[k]) for k in keys)
    return sum(plan[k].bits * int(weight_numels[k]) for k in keys) / total

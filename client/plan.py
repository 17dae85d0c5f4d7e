"""The plan job: how much each point of the model would cost at its low bit width, measured on the
device's own text (the mixed-precision plan of ``server.rounds``, design.md section 3).

FIT (Zandonati et al., 2023), the empirical-Fisher form of HAWQ-V2's Hessian-trace weighting (Dong et
al., 2020): one forward and one backward pass per local sequence on the float model (every quantizer
in float mode, the round's smoothing in place), and per point the sum over that sequence of
``(g * delta)^2``, ``g`` the next-token loss gradient at the point's tensor and ``delta`` its
quantization error (``quant.mixed``):

- an activation point (a Linear's smoothed input, an attention operand): ``delta = Q(x) - x`` at the
  round's QParams, at the profile's activation spec (a point a plan already lifted is measured at
  its range on that low spec);
- a Linear's weight: ``delta = Q_low(W m) - Q_8(W m)`` (min-max at each spec, what a device derives),
  ``g`` the gradient of this sequence's loss at the effective weight.

The sums are additive over sequences, so the server's sum over clients is the pooled estimate. torch
is imported here (autograd), as in ``client.learn``, whose model this job shares.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.affine import qparams_to_range, range_to_qparams
from quant.instrument import quant_points, set_qparams
from quant.mixed import activation_plan_error, fit_term, weight_plan_error
from quant.qparams import QParams
from quant.spec import QuantSpec, weight_spec
from quant.wire import Instruction, PlanReply


class _Tap(torch.autograd.Function):
    """The identity, whose backward hands the gradient at a point to ``on_grad``. FIT needs each
    gradient once, not kept: the frozen weights used to enter the graph as leaves, and every
    leaf kept its ``.grad`` to the end of the backward pass (the size of the model again). The
    scalar ``anchor`` puts the output in the graph when ``x`` (a frozen weight, the first
    activation) is not."""

    @staticmethod
    def forward(ctx, x, anchor, on_grad):
        ctx.on_grad = on_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.on_grad(g)
        return (g if ctx.needs_input_grad[0] else None), None, None


def plan_keys_problems(model: nn.Module, ins: Instruction) -> list[str]:
    """Keys of a plan instruction this model does not have (the ClientApp checks before patching)."""
    points = quant_points(model)
    return [k for k in ins.keys if k not in points]


def plan_sensitivity(model: nn.Module, qparams: QParams | None, ins: Instruction, data,
                     low_activation: QuantSpec, low_weight: QuantSpec) -> tuple[PlanReply, dict]:
    """FIT sums per point of ``ins.keys`` over the local sequences ``data`` [N, T]; ``(PlanReply,
    metrics)``. ``model`` is instrumented (``quant.instrument.quantize_``); ``qparams`` (default the
    instruction's) are loaded first, specs included (``set_qparams(respec=True)``: a plan's).
    ``low_activation``, ``low_weight``: the profile's specs (its QuantConfig's), what the plan
    measures against int16 and int8 per-channel weights. The model's point modes and
    parameters' ``requires_grad`` are restored on return; its weight points are min-max after
    it (every point runs in float mode here, a weight's delta is min-max at both specs: the
    importance, which only ranges weight points, is not applied)."""
    from client.learn import _sequences

    if ins.job != "plan":
        raise ValueError(f"plan job got a {ins.job!r} instruction")
    qparams = ins.qparams if qparams is None else qparams
    seqs = _sequences(data)
    unknown = plan_keys_problems(model, ins)
    if unknown:
        raise ValueError(f"instruction names points this model does not have: {unknown[:5]}")
    set_qparams(model, qparams, respec=True, rank_weights=False)   # the weights' own points go unused
    points = quant_points(model)
    keys = list(ins.keys)
    low: dict[str, tuple] = {}          # activation key -> (scale, zero_point, spec) at the low spec
    for k in keys:
        q = points[k]
        if q.kind == "activations":
            if not q.calibrated:
                raise ValueError(f"{k}: no range yet (a plan round follows a statistics round)")
            s, z = q.scale.numpy(), q.zero_point.numpy()
            if q.spec != low_activation:
                lo, hi = qparams_to_range(s, z, q.spec)
                s, z = range_to_qparams(float(lo), float(hi), low_activation)
            low[k] = (torch.as_tensor(np.asarray(s, np.float32)), torch.as_tensor(np.asarray(z)), low_activation)
    w_delta: dict[str, torch.Tensor] = {}
    acc = {k: 0.0 for k in keys}
    anchor = torch.zeros((), requires_grad=True)    # makes every tapped tensor part of the graph

    def hook(module, inputs, output):
        k = module.key
        if k not in acc:
            return None
        x = inputs[0]
        with torch.no_grad():
            if module.kind == "weights":
                if k not in w_delta:
                    w_delta[k] = weight_plan_error(x, low_weight, weight_spec(8))
                d = w_delta[k]
            else:
                d = activation_plan_error(x, *low[k])

        def add(g, k=k, d=d):
            acc[k] += fit_term(g, d)
        return _Tap.apply(x, anchor, add)

    saved_modes = [(q, q.mode) for q in points.values()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    metrics = {"num-examples": int(len(seqs)), "batch_size": 1}
    t0 = time.perf_counter()
    tokens = 0
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        for q, _ in saved_modes:
            q.mode = "float"
        handles = [q.register_forward_hook(hook) for k, q in points.items() if k in acc]
        for i in range(len(seqs)):      # one backward per sequence: the weights' FIT is per sequence
            ids = seqs[i:i + 1]
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local loss is {float(loss)}")
            loss.backward()
            tokens += ids.shape[1] - 1
        bad = [k for k, v in acc.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(f"sensitivity of {bad[:3]} is not finite")
    finally:
        for h in handles:
            h.remove()
        for q, mode in saved_modes:
            q.mode = mode
        for p, flag in grads:
            p.requires_grad_(flag)
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["tokens"] = tokens
    return PlanReply(dict(acc), tokens, int(len(seqs))), metrics


__all__ = ["plan_sensitivity"]

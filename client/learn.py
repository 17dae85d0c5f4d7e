"""The learned-range job (design.md section 4, LSQ / LSQ+) on an instrumented torch model.

Unlike the rest of ``client/`` (numpy + onnxruntime), this job needs autograd, so torch is imported
here and only here. It does not import ``server/`` or ``simulation/``.

``learn_ranges(model, qparams, ins_or_keys, data, config)``, ``config`` a
``quant.learn_config.LearnConfig`` (torch-free there, so that the server's config can hold one):

1. loads the global ``qparams`` (``set_qparams``) and puts the chosen points in ``learn`` mode, i.e.
   LSQ+ with trainable ``(log_s, beta)`` started from ``quant.lsq.init_from_qparams``; every other
   parameter of the model is frozen (weights fixed);
2. runs ``config.steps`` Adam steps on the local token ids, ``config.batch_size`` sequences a step,
   cycling through the data in order; the loss is the next-token cross-entropy or the KL divergence
   to the float model's logits (every quantizer in float mode, same batch);
3. returns ``delta = local - global`` per key, float32, where ``global`` is
   ``init_from_qparams(scale, zero_point)`` of the instruction's QParams, which equals
   ``server.aggregate.learned_from_qparams`` bit for bit (``beta = -z s`` for symmetric points too,
   so their ``delta_beta`` is ``-z_sym * (s_local - s_global)``, zero for a zero-centred spec);
4. leaves the model reusable: the learned points are back in ``quant`` mode with the *starting*
   qparams (the learned values are in the reply, not in the model), the other points in the mode they
   had, and every parameter's ``requires_grad`` as it was. Logits afterwards are those before the job.

Step size. Adam moves each parameter by about ``lr`` per step whatever the gradient's scale, so the
LSQ gradient scale ``g`` matters little and ``lr`` is a step in *parameter units*. For ``log_s``
that is a relative change of the scale: the default ``lr = 0.03`` lets one round of 8 steps move a
range by up to ~25 %, enough to correct a poor calibration in a few rounds, while one client's
round cannot move a range by more than that (the server averages the deltas anyway). Measured on the
tiny Llama (trained briefly, 8-bit activations, min-max ranges widened x4, 8 steps): lr 0.01 lowered
the next-token loss 0.8705 -> 0.8682 but raised the distillation loss 0.00495 -> 0.00533; lr 0.03
lowered both (-> 0.8635, -> 0.00345). In one probe at 4-bit activations widened x4 (~2 effective
bits) every lr tried from 0.003 to 0.03 raised the next-token loss after 8 steps: not tuned there. ``beta`` is in the
activation's units, which differ by orders of magnitude between points, so each point's ``beta``
gets its own learning rate ``beta_step_lsb * s0`` (s0 the starting scale): a step moves the range's
offset by about ``beta_step_lsb`` quantization steps. It used to be ``lr * (qmax - qmin) * s0``, the
same fraction of the range as a ``log_s`` step; on SmolLM2 that moved the lower end of a
``down_proj`` input's range (-52 .. 3261) by ~100 per step, clipped the dense mass near zero, and
two steps took the local loss from 5.20 to 14.18 (bench/client_jobs.py). The offset of an 8-bit
range needs LSB-sized moves, not range-sized ones.

Metrics, as the other jobs: ``num-examples`` (local sequences, the aggregation weight), ``wall_s``,
``batch_size``, ``steps``, ``tokens`` (predicted tokens seen in training), ``loss_before`` /
``loss_after`` (first batch, before the first step / after the last one), ``max_rss_mb``
(resource.getrusage high-water mark of the process: it bounds the job's memory from above).
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant import lsq
from quant.instrument import quant_points, set_qparams
from quant.learn_config import LearnConfig
from quant.qparams import QParams
from quant.wire import Instruction, LsqReply


def _sequences(data) -> torch.Tensor:
    seqs = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] < 2:
        raise ValueError(f"local data must be token ids [N >= 1, T >= 2], got shape {seqs.shape}")
    if not np.issubdtype(seqs.dtype, np.integer):
        raise ValueError(f"local data must be integer token ids, got {seqs.dtype}")
    return torch.from_numpy(seqs.astype(np.int64))


def chosen_keys(model: nn.Module, qparams: QParams, ins_or_keys, which: str) -> list[str]:
    """The points the job learns (see ``learn_ranges``); ValueError when they do not fit the model
    or the QParams. Public: the ClientApp checks them before it patches."""
    if isinstance(ins_or_keys, Instruction):
        if ins_or_keys.job != "lsq":
            raise ValueError(f"learn_ranges got a {ins_or_keys.job!r} instruction")
        keys = list(ins_or_keys.keys)
    else:
        keys = sorted(ins_or_keys or ())
    points = quant_points(model)
    if not keys:  # none named: every point of the chosen kind that the QParams cover
        keys = sorted(k for k, q in points.items()
                      if (which == "all" or q.kind == "activations") and k in qparams.points)
    unknown = [k for k in keys if k not in points]
    if unknown:
        raise ValueError(f"keys that are not quantization points of this model: {unknown[:5]}")
    missing = [k for k in keys if k not in qparams.points]
    if missing:
        raise ValueError(f"learned points without global QParams (no delta is defined): {missing[:5]}")
    if which == "activations":
        weights = [k for k in keys if points[k].kind != "activations"]
        if weights:
            raise ValueError(f"config.which='activations' but weight points were asked: {weights[:3]}")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique")
    if not keys:
        raise ValueError("no points to learn")
    return keys


@contextlib.contextmanager
def _float_quantizers(model: nn.Module):
    """Every quantizer as identity for the teacher pass. Sets the mode attribute directly (not
    ``set_mode``), so that points in learn mode keep their trainable (log_s, beta) untouched."""
    saved = [(q, q.mode) for q in quant_points(model).values()]
    try:
        for q, _ in saved:
            q.mode = "float"
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def _loss(model: nn.Module, ids: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "distill":
        with torch.no_grad(), _float_quantizers(model):
            teacher = model(input_ids=ids).logits.float()
        student = model(input_ids=ids).logits.float()
        v = student.shape[-1]
        # KL(teacher || student), mean over token positions
        return F.kl_div(F.log_softmax(student.reshape(-1, v), -1), F.log_softmax(teacher.reshape(-1, v), -1),
                        log_target=True, reduction="batchmean")
    logits = model(input_ids=ids).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _batches(seqs: torch.Tensor, b: int, steps: int) -> Iterable[torch.Tensor]:
    n = len(seqs)
    for i in range(steps):
        idx = (torch.arange(b) + i * b) % n
        yield seqs[idx]


def learn_ranges(model: nn.Module, qparams: QParams | None, ins_or_keys, data,
                 config: LearnConfig | None = None) -> tuple[LsqReply, dict]:
    """Local LSQ / LSQ+ steps from the global ``qparams``; ``(LsqReply, metrics)``.

    ``model`` is already instrumented (``quant.instrument.quantize_``). ``ins_or_keys`` is an ``lsq``
    Instruction (its ``keys``; ``qparams`` may then be None for ``ins.qparams``) or a list of point
    keys; empty means every activation point (``which='activations'``) or every point (``'all'``)
    that ``qparams`` covers. ``data`` is token ids ``[N, T]``. See the module docstring for what the
    model is left in.
    """
    config = config or LearnConfig()
    if qparams is None:
        if not isinstance(ins_or_keys, Instruction):
            raise ValueError("qparams may be None only with an Instruction")
        qparams = ins_or_keys.qparams
    seqs = _sequences(data)
    keys = chosen_keys(model, qparams, ins_or_keys, config.which)
    b = min(config.batch_size, len(seqs))
    metrics = {"num-examples": int(len(seqs)), "batch_size": b, "steps": config.steps}

    points = quant_points(model)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    set_qparams(model, qparams, respec=True)  # checks everything first (a plan's specs too): on refusal the model is unchanged
    glob = {k: lsq.init_from_qparams(qparams.points[k].scale, qparams.points[k].zero_point,
                                     qparams.points[k].spec) for k in keys}
    t0 = time.perf_counter()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        for k in keys:
            points[k].set_mode("learn")
        groups = []
        for k in keys:
            q = points[k]
            groups.append({"params": [q.log_s], "lr": config.lr})
            if q.beta is not None:
                s0 = torch.exp(q.log_s.detach())
                # one lr per point: the largest starting scale of the point (per-tensor: the scale)
                groups.append({"params": [q.beta], "lr": config.beta_step_lsb * float(s0.max())})
        first = seqs[:b]
        with torch.no_grad():
            loss_before = float(_loss(model, first, config.loss))
        opt = torch.optim.Adam(groups)
        tokens = 0
        for ids in _batches(seqs, b, config.steps):
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, ids, config.loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local loss is {float(loss)}")
            loss.backward()
            opt.step()
            tokens += ids.shape[0] * (ids.shape[1] - 1)
        with torch.no_grad():
            loss_after = float(_loss(model, first, config.loss)) if config.steps else loss_before
        d_log_s, d_beta = {}, {}
        for k in keys:
            q = points[k]
            log_s = q.log_s.detach().to(torch.float64)
            if q.beta is not None:
                beta = q.beta.detach().to(torch.float64)
            else:  # symmetric: beta = -z_sym * s, as the server's learned_from_qparams has it
                beta = -float(q.spec.symmetric_zero_point) * torch.exp(log_s)
            g_log_s, g_beta = glob[k]
            d_log_s[k] = (log_s - g_log_s).numpy().astype(np.float32)
            d_beta[k] = (beta - g_beta).numpy().astype(np.float32)
            if not (np.isfinite(d_log_s[k]).all() and np.isfinite(d_beta[k]).all()):
                raise FloatingPointError(f"{k}: learned delta is not finite")
    finally:
        for k in keys:  # leave learn mode (this commits the learned values: overwritten next)
            points[k].set_mode("quant")
        set_qparams(model, qparams, respec=True)  # the starting qparams; modes of the other points are untouched
        for p, flag in grads:
            p.requires_grad_(flag)
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics.update({"tokens": tokens, "loss_before": loss_before, "loss_after": loss_after})
    return LsqReply(d_log_s, d_beta, loss_before, loss_after), metrics


__all__ = ["learn_ranges"]

"""The client's jobs: plain functions of (runtime, instruction, local data) -> reply and metrics
(design.md sections 4 and 5). numpy + onnxruntime only (through client.runtime).

Local data is an int array ``[N, T]`` of token ids, taken ``batch_size`` sequences at a time
(lowered to fit the profile's memory budget). Every job returns metrics with ``num-examples``
(sequences), ``wall_s``, ``batch_size``, and two memory figures, which measure different things:
``numpy_peak_mb`` is tracemalloc's peak of Python/numpy allocations during the job (ORT's output
arrays are numpy arrays, so the exposed activations are counted; ORT's internal arena is not) and
``max_rss_mb`` is the process's resident high-water mark from resource.getrusage (it includes
everything, but never goes down, so it bounds the job from above rather than measuring it).
"""

from __future__ import annotations

import math
import resource
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np

from client.profiles import DeviceProfile, plan_batch
from client.runtime import DeviceRuntime
from quant import dp
from quant.affine import qparams_to_range
from quant.calibrate import CalibratorConfig, calibrate
from quant.stats import ActivationStats, channel_absmax, channel_sqsum, merge, merge_absmax, observe
from quant.wire import HessianReply, Instruction, ScoutReply, StatsReply


@contextmanager
def _measured(metrics: dict, trace: bool = True):
    """wall_s, max_rss_mb and, with ``trace``, numpy_peak_mb (tracemalloc traces every
    allocation: a job of many small numpy temporaries pays for it in time)."""
    started = trace and not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    if trace:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        yield metrics
    finally:
        metrics["wall_s"] = time.perf_counter() - t0
        if trace:
            metrics["numpy_peak_mb"] = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        if started:
            tracemalloc.stop()
        metrics["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sequences(data) -> np.ndarray:
    seqs = np.asarray(data, dtype=np.int64)
    if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] < 2:
        raise ValueError(f"local data must be token ids [N >= 1, T >= 2], got shape {seqs.shape}")
    return seqs


def exposed_widths(rt: DeviceRuntime, keys) -> list[int]:
    """Width of each distinct float tensor the capture exposes for ``keys`` (the widest Linear
    input for points whose width the weights do not tell, e.g. attention operands)."""
    widths = rt.activation_widths()
    widest = max(widths.values(), default=1)
    by_tensor = {}
    for k in keys:
        by_tensor[rt.capture.tensors.get(k, k)] = widths.get(k, widest)
    return list(by_tensor.values())


def job_keys(rt: DeviceRuntime, ins: Instruction) -> list[str]:
    """The points a job covers (the instruction's, or every activation point); ValueError naming
    the ones this model does not have. Public: the ClientApp checks them before it patches."""
    keys = list(ins.keys) or rt.activation_keys()
    unknown = [k for k in keys if k not in rt.capture.tensors]
    if unknown:
        raise ValueError(f"instruction names points this model does not have: {unknown[:5]}")
    return keys


def _batches(rt, seqs, keys, batch_size, profile, what, rotated: bool = True):
    b = plan_batch(batch_size, seqs.shape[1], exposed_widths(rt, keys), profile, what)
    for i in range(0, len(seqs), b):
        yield b, seqs[i:i + b], rt.float_activations(seqs[i:i + b], keys, rotated)


def scout(rt: DeviceRuntime, ins: Instruction, data, batch_size: int = 8,
          profile: DeviceProfile | None = None) -> tuple[ScoutReply, dict]:
    """Observed (min, max) and value count per point of ``ins.keys`` on the float graph, the
    per-channel abs-max of the points in ``ins.absmax`` (SmoothQuant's statistic) and the
    per-channel sum of squares of those in ``ins.sqsum`` (float64: the weight columns' importance)."""
    seqs = _sequences(data)
    keys = job_keys(rt, ins)
    lo = {k: math.inf for k in keys}
    hi = {k: -math.inf for k in keys}
    n = {k: 0 for k in keys}
    absmax: dict[str, np.ndarray] = {}
    sqsum: dict[str, np.ndarray] = {}
    metrics = {"num-examples": len(seqs)}
    with _measured(metrics):
        # the inputs' own channels, unrotated (SmoothQuant's abs-max, the weights' importance); the
        # server sizes a rotated input's grid from them too (server.rounds._scout)
        for b, _, acts in _batches(rt, seqs, keys, batch_size, profile, "scout", rotated=False):
            for k, x in acts.items():
                if np.isnan(x).any():
                    raise ValueError(f"{k}: activation has NaN values")
                lo[k], hi[k] = min(lo[k], float(x.min())), max(hi[k], float(x.max()))
                n[k] += x.size
                if k in ins.absmax:
                    m = channel_absmax(x, axis=-1)
                    absmax[k] = merge_absmax(absmax[k], m) if k in absmax else m
                if k in ins.sqsum:
                    q = channel_sqsum(x)
                    sqsum[k] = sqsum[k] + q if k in sqsum else q
            del acts
        metrics["batch_size"] = b
    _check_channels(absmax, ins)
    _check_channels(sqsum, ins, "sqsum")
    return ScoutReply({k: (lo[k], hi[k]) for k in keys}, n, absmax, sqsum), metrics


def hessian(rt: DeviceRuntime, ins: Instruction, data, batch_size: int = 8,
            profile: DeviceProfile | None = None) -> tuple[HessianReply, dict]:
    """``sum_t x_t x_t^T`` (float64) of the float input of each point of ``ins.hessian`` over the local
    text: its own channels, neither smoothed nor rotated (the server derives each Linear's from it,
    ``quant.gptq.linear_hessian``). GPTQ's ``H``: additive, so the fleet's is the clients' sum."""
    if ins.job != "hessian":
        raise ValueError(f"Hessian job got a {ins.job!r} instruction")
    seqs = _sequences(data)
    keys = job_keys(rt, ins)
    wrong = hessian_problems(rt, ins)
    if wrong:
        raise ValueError(wrong[0])
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    metrics = {"num-examples": len(seqs)}
    with _measured(metrics, trace=False):
        b = plan_batch(batch_size, seqs.shape[1], exposed_widths(rt, keys), profile, "hessian",
                       fixed_bytes=sum(8 * c * c for c in ins.hessian.values()))
        for i in range(0, len(seqs), b):
            for k, x in rt.capture.run(seqs[i:i + b], keys).items():
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[k] = sums[k] + x.T @ x if k in sums else x.T @ x
            tokens += int(seqs[i:i + b].size)
        metrics["batch_size"] = b
    return HessianReply(sums, tokens), metrics


def hessian_problems(rt: DeviceRuntime, ins: Instruction) -> list[str]:
    """What in a hessian instruction this model contradicts: a key that is not a Linear's input, or a
    channel count other than the Linear's input width. Public: the ClientApp refuses such an
    instruction before any work."""
    out = []
    for k, c in ins.hessian.items():
        path = k.rsplit(":", 1)[0]
        if not k.endswith(":input") or path not in rt.linears:
            out.append(f"{k}: not the input of a Linear of this model")
        elif rt._weight_shape(path)[1] != c:      # both runtimes read it from the weights' header
            out.append(f"{k}: the server expects {c} channels, the Linear takes {rt._weight_shape(path)[1]}")
    return out


def _check_channels(got: dict[str, np.ndarray], ins: Instruction, what: str = "absmax") -> None:
    for k, c in getattr(ins, what).items():
        if k not in got:
            raise ValueError(f"{k}: {what} asked for a point the job did not cover")
        if got[k].shape != (c,):
            raise ValueError(f"{k}: the server expects {c} channels, the activation has {got[k].shape[0]}")


def statistics(rt: DeviceRuntime, ins: Instruction, data, batch_size: int = 8,
               profile: DeviceProfile | None = None) -> tuple[StatsReply, dict]:
    """ActivationStats on the instruction's grid per key, merged batch by batch, and per-channel
    abs-max for the keys in ``ins.absmax`` (their channel count is checked)."""
    if ins.job != "stats":
        raise ValueError(f"statistics job got a {ins.job!r} instruction")
    seqs = _sequences(data)
    keys = job_keys(rt, ins)
    stats: dict[str, ActivationStats] = {}
    absmax: dict[str, np.ndarray] = {}
    metrics = {"num-examples": len(seqs)}
    with _measured(metrics):
        for b, _, acts in _batches(rt, seqs, keys, batch_size, profile, "statistics"):
            for k, x in acts.items():
                s = observe(x, ins.grids[k])
                stats[k] = merge(stats[k], s) if k in stats else s
                if k in ins.absmax:
                    m = channel_absmax(x, axis=-1)
                    absmax[k] = merge_absmax(absmax[k], m) if k in absmax else m
            del acts
        metrics["batch_size"] = b
    _check_channels(absmax, ins)
    return StatsReply(stats, absmax), metrics


def dp_vector(reply: StatsReply, ins: Instruction, calibrator: CalibratorConfig, clip: float) -> np.ndarray:
    """What a client sends in a differentially private statistics round instead of its histograms
    (``quant.dp``, docs/privacy.md): its own range per point of ``ins.keys`` by the profile's
    ``calibrator`` on its own statistics, as ``log2`` of its width over the instruction's QParams'
    (the current release) and the shift of zero's place (``quant.dp.client_vector``), clipped to L2
    norm ``clip``. A point it saw no value at contributes 0."""
    centres = {k: tuple(float(v) for v in qparams_to_range(ins.qparams.points[k].scale,
                                                           ins.qparams.points[k].zero_point,
                                                           ins.qparams.points[k].spec)) for k in ins.keys}
    own = {k: calibrate(reply.stats[k], ins.qparams.points[k].spec, calibrator)
           for k in ins.keys if reply.stats[k].n > 0}
    return dp.client_vector(own, centres, clip)


def evaluate(rt: DeviceRuntime, ins: Instruction | None, data, batch_size: int = 8,
             profile: DeviceProfile | None = None) -> dict:
    """Perplexity of the integer runtime on held-out ``data``. With an instruction, its QParams
    are patched in first (a refused patch raises, nothing changed)."""
    seqs = _sequences(data)
    metrics = {"num-examples": len(seqs)}
    with _measured(metrics):
        vocab = rt.logits_width()
        b = plan_batch(batch_size, seqs.shape[1], [vocab], profile, "evaluate")  # before patching:
        if ins is not None and ins.qparams.points:                                # a budget error changes nothing
            metrics["patch_s"] = rt.patch(ins.qparams)["total_s"]
        total, count = rt.evaluate(seqs, batch_size=b)
        metrics.update({"batch_size": b, "nll_sum": total, "tokens": count,
                        "perplexity": float(np.exp(total / count)), "version": int(rt.qparams.version)})
    return metrics

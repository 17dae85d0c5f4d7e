"""The learned-range job computed by the device's own runtime (issue 17): ONNX Runtime and numpy,
no torch (tests/test_learn_runtime.py checks that importing and running it loads no torch).

``learn_ranges_runtime(rt, ins, data, config, batch_size, profile)`` answers an ``lsq``
instruction with the same ``quant.wire.LsqReply`` as the torch job (``client.learn``): per point
the move of ``(log s, beta)`` from the instruction's QParams, two float32 numbers per point, so the
upload, the server's validation and its aggregation are those of the torch job. What differs is how
the move is found (``quant.reconstruct``, layer-wise reconstruction):

1. one pass over the local sequences on the float graph the statistics job already captures
   (``DeviceRuntime.float_activations``), a batch at a time within the profile's memory budget;
   each point's input is folded into a *weighted histogram* whose channel weights are the squared
   column norms of its consumer Linear (``d_j = ||W[:, j]||^2``, smoothing folded in), so that the
   histogram measures the error the range causes in that Linear's output, not in its input;
2. per point, the range minimising that error (the MSE calibrator's search on the weighted
   histogram), kept only when it beats the instruction's range on the local data;
3. ``delta = learned(new) - learned(instruction's)`` with ``learned = (log s, -z s)``, as the
   server's ``learned_from_qparams`` has it.

Cost: one float pass plus a bincount per point and batch (a few rows at a time) and one search
over all points (``quant.reconstruct.reconstruct_points``: the points' candidates evaluated
together, numpy); the column norms are computed once per runtime, streaming each weight from the
bundle's npz (the largest, ``lm_head``, is never held whole). Only Linear inputs can be learned
(``which = "activations"``); every SmolLM2 activation point is one.

Metrics as the other jobs (``num-examples``, ``wall_s``, ``batch_size``, ``max_rss_mb``; not
``numpy_peak_mb``: tracing the thousands of numpy temporaries of the histograms and the search
slowed the job on SmolLM2 from 2.44 s to 2.93 s: bench/results/client_jobs_runtime_v4.json
against client_jobs_runtime.json), where the time went (``capture_s``: the float graph's runs,
``histogram_s``, ``search_s``), ``tokens`` (values seen per point / width), ``points``, and
``loss_before`` / ``loss_after``: the mean over points of the relative output error (weighted
squared error / weighted energy) with the instruction's ranges and with the new ones, on the local
data.
"""

from __future__ import annotations

import time
import weakref

import numpy as np

from client.jobs import _batches, _measured, _sequences
from client.profiles import DeviceProfile
from client.runtime import DeviceRuntime, FloatLinears
from quant import reconstruct as rc
from quant.learn_config import LearnConfig
from quant.qparams import rotation_block
from quant.smoothing import fold_weight
from quant.wire import Instruction, LsqReply

_NORMS: "weakref.WeakKeyDictionary[DeviceRuntime, dict]" = weakref.WeakKeyDictionary()
_ROWS = 2048


def runtime_keys(rt: DeviceRuntime, ins: Instruction) -> list[str]:
    """The points of an lsq instruction this job can learn: every key must be the input of a
    Linear the bundle has float weights for; ValueError otherwise. Public: the ClientApp checks
    them before it patches."""
    if ins.job != "lsq":
        raise ValueError(f"the runtime learned-range job got a {ins.job!r} instruction")
    keys = list(ins.keys)
    if not keys:
        raise ValueError("no points to learn")
    bad = [k for k in keys if not (k.endswith(":input") and k.rsplit(":", 1)[0] in rt.linears)]
    if bad:
        raise ValueError(f"not inputs of Linears this runtime holds weights for: {bad[:5]}")
    unknown = [k for k in keys if k not in rt.capture.tensors]
    if unknown:
        raise ValueError(f"instruction names points this model does not have: {unknown[:5]}")
    missing = [k for k in keys if k not in ins.qparams.points]
    if missing:
        raise ValueError(f"learned points without global QParams: {missing[:5]}")
    return keys


def column_sq_norms(linears, path: str, rows=None) -> np.ndarray:
    """``sum_i W_ij^2`` (float64) of a Linear's weight, read ``_ROWS`` rows at a time from a
    bundle's npz (``FloatLinears``), or from any ``{path: (weight, bias)}`` mapping; ``rows`` (a
    function of a block of rows) transforms them first (a rotated Linear's ``(W * m) R``)."""
    if rows is not None:
        w = linears[path][0]
        return sum((np.einsum("ij,ij->j", r, r, dtype=np.float64) for r in
                    (rows(w[i:i + _ROWS]) for i in range(0, len(w), _ROWS))), np.zeros(np.shape(w)[1]))
    if isinstance(linears, FloatLinears):
        with linears._npz.zip.open(f"w:{path}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            if not fortran and len(shape) == 2:
                rows, cols = shape
                out = np.zeros(cols, np.float64)
                for i in range(0, rows, _ROWS):
                    n = min(_ROWS, rows - i)
                    w = np.frombuffer(f.read(n * cols * dtype.itemsize), dtype=dtype).reshape(n, cols)
                    out += np.einsum("ij,ij->j", w, w, dtype=np.float64)
                return out
    return rc.output_weights(linears[path][0])


def consumer_weights(rt: DeviceRuntime, key: str) -> np.ndarray:
    """``d_j`` of a point (``quant.reconstruct.output_weights``): the consumer's squared column
    norms (cached per runtime: the float weights never change) times the held smoothing squared;
    a rotated input's, those of ``(W * m) R`` (its columns see ``(x / m) R``: cached per factors)."""
    path = key.rsplit(":", 1)[0]
    cache = _NORMS.setdefault(rt, {})
    block = rotation_block(rt.qparams, path)
    if block:
        m = rt.qparams.smoothing.get(path)
        tag = (path, block, None if m is None else np.asarray(m, np.float32).tobytes())
        if tag not in cache:
            if len(cache) > 4 * len(rt.linears):    # mostly entries of factors no longer held
                cache.clear()
            cache[tag] = column_sq_norms(rt.linears, path, lambda w: fold_weight(w, m, block))
        return cache[tag]
    if path not in cache:
        cache[path] = column_sq_norms(rt.linears, path)
    d = cache[path]
    m = rt.qparams.smoothing.get(path)
    return d if m is None else d * np.asarray(m, np.float64) ** 2


def learn_ranges_runtime(rt: DeviceRuntime, ins: Instruction, data, config: LearnConfig | None = None,
                         batch_size: int = 8, profile: DeviceProfile | None = None) -> tuple[LsqReply, dict]:
    """``(LsqReply, metrics)`` for an lsq instruction, on the runtime (module docstring). The
    runtime must already run the instruction's QParams' smoothing (the ClientApp patches first)."""
    config = config or LearnConfig(method="runtime")
    if config.which != "activations":
        raise ValueError("the runtime learned-range job learns activation ranges only (which='activations')")
    seqs = _sequences(data)
    keys = runtime_keys(rt, ins)
    pts = {k: ins.qparams.points[k] for k in keys}
    grids = {k: rc.grid_for(p.scale, p.zero_point, p.spec, config.bins) for k, p in pts.items()}
    metrics = {"num-examples": int(len(seqs)), "points": len(keys)}
    hists: dict[str, rc.WeightedHist] = {}
    spent = {"capture_s": 0.0, "histogram_s": 0.0}
    with _measured(metrics, trace=False):
        observe = _observer(rt, keys, config)
        b = batch_size
        t = time.perf_counter()
        for b, _, acts in _batches(rt, seqs, keys, batch_size, profile, "lsq"):
            t1 = time.perf_counter()
            spent["capture_s"] += t1 - t
            for k in keys:
                h = observe(k, acts[k], grids[k])
                hists[k] = rc.merge_weighted(hists[k], h) if k in hists else h
            del acts
            t = time.perf_counter()
            spent["histogram_s"] += t - t1
        d_log_s, d_beta, before, after = {}, {}, [], []
        found = rc.reconstruct_points(hists, pts)
        spent["search_s"] = time.perf_counter() - t
        for k in keys:
            r = found[k]
            d_log_s[k], d_beta[k] = r["delta_log_s"], r["delta_beta"]
            if not (np.isfinite(d_log_s[k]).all() and np.isfinite(d_beta[k]).all()):
                raise FloatingPointError(f"{k}: learned delta is not finite")
            before.append(r["rel_before"])
            after.append(r["rel_after"])
        metrics["batch_size"] = b
    metrics.update(spent)
    metrics["tokens"] = int(seqs.shape[0] * seqs.shape[1])
    metrics["loss_before"], metrics["loss_after"] = float(np.mean(before)), float(np.mean(after))
    return LsqReply(d_log_s, d_beta, metrics["loss_before"], metrics["loss_after"]), metrics


def local_histograms(rt: DeviceRuntime, ins: Instruction, data, config: LearnConfig | None = None,
                     batch_size: int = 8) -> dict[str, rc.WeightedHist]:
    """The weighted histograms the job builds, returned instead of searched: what a centralized
    reference pools over clients (bench/runtime_ranges.py), never sent by a device."""
    config = config or LearnConfig(method="runtime")
    seqs = _sequences(data)
    keys = runtime_keys(rt, ins)
    grids = {k: rc.grid_for(ins.qparams.points[k].scale, ins.qparams.points[k].zero_point,
                            ins.qparams.points[k].spec, config.bins) for k in keys}
    hists: dict[str, rc.WeightedHist] = {}
    observe = _observer(rt, keys, config)
    for _, _, acts in _batches(rt, seqs, keys, batch_size, None, "lsq"):
        for k in keys:
            h = observe(k, acts[k], grids[k])
            hists[k] = rc.merge_weighted(hists[k], h) if k in hists else h
    return hists


def _observer(rt: DeviceRuntime, keys, config: LearnConfig):
    """``observe(key, x, grid) -> WeightedHist`` with the config's objective and weighting: the
    consumer's column norms (``objective = "output"``) or 1 (``"input"``), in ``config.groups``
    classes (``quant.reconstruct.channel_groups``) or exactly (``groups = 0``)."""
    d = {k: consumer_weights(rt, k) if config.objective == "output" else None for k in keys}
    groups: dict = {}

    def observe(k, x, grid):
        w = d[k] if d[k] is not None else np.ones(x.shape[-1])
        if config.groups == 0:
            return rc.observe_weighted(x, w, grid)
        if k not in groups:
            groups[k] = rc.channel_groups(w, config.groups)
        return rc.observe_grouped(x, groups[k], grid)

    return observe


__all__ = ["learn_ranges_runtime", "runtime_keys", "consumer_weights", "column_sq_norms", "local_histograms"]

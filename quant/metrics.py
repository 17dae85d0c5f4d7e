"""Perplexity, defined once over numpy logits so that the torch model and the integer runtime
(ONNX Runtime, which returns numpy) are scored by the same arithmetic."""

from __future__ import annotations

import numpy as np


def nll_sum_and_count(logits, ids) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens).

    logits [B, T, V] (numpy or torch) are the model outputs for ids [B, T]; position t predicts
    ids[:, t + 1], so each row yields T - 1 predictions. Log-sum-exp is max-shifted per token and
    the sum accumulates in float64; rows are processed one at a time to bound memory (V = 49152).
    """
    if hasattr(logits, "detach"):  # a torch tensor; quant.metrics stays importable without torch
        logits = logits.detach().cpu().float().numpy()
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    logits, ids = np.asarray(logits), np.asarray(ids)
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and ids [B, T], got {logits.shape}, {ids.shape}")
    total = 0.0
    for row, target in zip(logits[:, :-1], ids[:, 1:]):
        m = row.max(axis=-1, keepdims=True)
        lse = m[:, 0].astype(np.float64) + np.log(np.exp(row - m).sum(axis=-1, dtype=np.float64))
        total += float((lse - row[np.arange(len(target)), target]).sum())
    return total, int(ids.shape[0] * (ids.shape[1] - 1))


def perplexity_from_logits(logits, ids) -> float:
    """exp(mean next-token NLL) of one batch of numpy logits; for batches, add up
    `nll_sum_and_count` yourself and take exp(sum / count) once."""
    total, count = nll_sum_and_count(logits, ids)
    return float(np.exp(total / count))


def sequence_nll(logits, ids) -> np.ndarray:
    """float64 [B]: each row's summed next-token NLL (the terms of ``nll_sum_and_count``), so a
    bootstrap can resample sequences."""
    logits, ids = np.asarray(logits), np.asarray(ids)
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and ids [B, T], got {logits.shape}, {ids.shape}")
    out = np.empty(len(ids), dtype=np.float64)
    for b, (row, target) in enumerate(zip(logits[:, :-1], ids[:, 1:])):
        m = row.max(axis=-1, keepdims=True)
        lse = m[:, 0].astype(np.float64) + np.log(np.exp(row - m).sum(axis=-1, dtype=np.float64))
        out[b] = (lse - row[np.arange(len(target)), target]).sum()
    return out


def _log_softmax64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    m = rows.max(axis=-1, keepdims=True)
    return rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))


def next_token_fidelity(float_logits, quant_logits, chunk_elements: int = 1 << 22
                        ) -> tuple[np.ndarray, np.ndarray]:
    """How closely a quantized model follows the float one, per sequence: (summed KL(float ||
    quantized) of the next-token distributions in nats, number of positions where both pick the
    same top-1 token), float64 [B] each, over the positions that predict a token (T - 1 per row,
    as in ``nll_sum_and_count``). Unlike perplexity on the text, neither can improve by fitting
    the text: adaptation to a domain shows as perplexity below float with KL above zero.
    Computed in float64 a chunk of positions at a time (``chunk_elements`` = positions x vocab),
    so a 262k vocabulary stays within tens of MB beyond the two batches of logits."""
    f, q = np.asarray(float_logits), np.asarray(quant_logits)
    if f.ndim != 3 or f.shape != q.shape:
        raise ValueError(f"expected two logits arrays [B, T, V] of one shape, got {f.shape}, {q.shape}")
    B, T, V = f.shape
    step = max(1, chunk_elements // V)
    kl, agree = np.zeros(B, np.float64), np.zeros(B, np.float64)
    for b in range(B):
        for t in range(0, T - 1, step):
            lf, lq = _log_softmax64(f[b, t:min(t + step, T - 1)]), _log_softmax64(q[b, t:min(t + step, T - 1)])
            kl[b] += float((np.exp(lf) * (lf - lq)).sum())
            agree[b] += float((lf.argmax(-1) == lq.argmax(-1)).sum())
    return kl, agree


def float_top_k(float_logits, k: int, chunk_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """The float model's ``k`` most likely next tokens at every predicting position, most likely
    first: (ids int32 [B, T - 1, k], log-probabilities float32 [B, T - 1, k]). A compact reference
    (k of a vocabulary of 49k-262k) that ``top_k_fidelity`` compares a quantized model against."""
    f = np.asarray(float_logits)
    if f.ndim != 3:
        raise ValueError(f"expected logits [B, T, V], got {f.shape}")
    B, T, V = f.shape
    k = min(k, V)
    step = max(1, chunk_elements // V)
    ids = np.empty((B, T - 1, k), np.int32)
    logp = np.empty((B, T - 1, k), np.float32)
    for b in range(B):
        for t in range(0, T - 1, step):
            lf = _log_softmax64(f[b, t:min(t + step, T - 1)])
            top = np.argpartition(-lf, k - 1, axis=-1)[:, :k]
            vals = np.take_along_axis(lf, top, -1)
            order = np.argsort(-vals, axis=-1, kind="stable")
            ids[b, t:t + len(lf)] = np.take_along_axis(top, order, -1)
            logp[b, t:t + len(lf)] = np.take_along_axis(vals, order, -1)
    return ids, logp


def top_k_fidelity(quant_logits, top_ids: np.ndarray, top_logp: np.ndarray,
                   chunk_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """``next_token_fidelity`` against a cached ``float_top_k`` reference: per sequence (summed KL,
    top-1 agreements). The KL is that of the two distributions coarsened to the float model's
    top k tokens plus one bucket for the rest, sum_topk p log(p/q) + r_p log(r_p / r_q) with r the
    mass outside the top k: never above the exact KL (coarsening cannot increase a divergence),
    and equal to it when the rest's ratio q/p is constant. Top-1 agreement is exact."""
    q = np.asarray(quant_logits)
    B, T, V = q.shape
    if top_ids.shape[:2] != (B, T - 1):
        raise ValueError(f"reference of shape {top_ids.shape} for logits {q.shape}")
    step = max(1, chunk_elements // V)
    kl, agree = np.zeros(B, np.float64), np.zeros(B, np.float64)
    for b in range(B):
        for t in range(0, T - 1, step):
            lq = _log_softmax64(q[b, t:min(t + step, T - 1)])
            ti, lp = top_ids[b, t:t + len(lq)], top_logp[b, t:t + len(lq)].astype(np.float64)
            lq_top = np.take_along_axis(lq, ti.astype(np.int64), -1)
            p = np.exp(lp)
            rest_p = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
            rest_q = np.clip(1.0 - np.exp(lq_top).sum(-1), 1e-300, 1.0)
            # below 1e-5 the rest's mass is the rounding of float32 log-probabilities, not mass
            tail = np.where(rest_p > 1e-5, rest_p * (np.log(np.maximum(rest_p, 1e-300)) - np.log(rest_q)), 0.0)
            kl[b] += float((p * (lp - lq_top)).sum() + tail.sum())
            agree[b] += float((ti[:, 0] == lq.argmax(-1)).sum())
    return kl, agree


def bootstrap_interval(columns: np.ndarray, statistic, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over sequences.

    ``columns`` [N, K] holds per-sequence sums (NLL, tokens, KL, ...); each of ``resamples`` draws
    picks N sequences with replacement (seeded: the same ``seed`` gives the same interval), adds
    their rows, and ``statistic(sums [R, K]) -> [R]`` turns the sums into the figure (a ratio of
    sums, so a sequence weighs by its tokens, as in the point estimate). Sequences, not tokens,
    are the unit: tokens of one text are not independent. Returns the (1 - level) / 2 and
    (1 + level) / 2 quantiles."""
    x = np.asarray(columns, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected per-sequence columns [N, K] with N >= 1, got shape {x.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level}, {resamples}")
    rng = np.random.default_rng(seed)
    n = len(x)
    sums = np.empty((resamples, x.shape[1]))
    for r0 in range(0, resamples, 256):          # counts [r, N] a block at a time: bounded memory
        idx = rng.integers(0, n, size=(min(256, resamples - r0), n))
        counts = np.stack([np.bincount(i, minlength=n) for i in idx])
        sums[r0:r0 + len(idx)] = counts @ x
    stats = np.asarray(statistic(sums), dtype=np.float64)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

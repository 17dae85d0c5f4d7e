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

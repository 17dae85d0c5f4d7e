"""Fidelity to the float model (KL, top-1 agreement) and the bootstrap over sequences, against
direct computations and cases whose answer is known."""

import math

import numpy as np
import pytest

from quant.metrics import (bootstrap_interval, float_top_k, next_token_fidelity, nll_sum_and_count, sequence_nll,
                           top_k_fidelity)
from simulation.evaluation import fidelity_columns, fidelity_summary, float_reference


def _direct_kl_top1(f, q):
    """KL(softmax f || softmax q) summed and top-1 agreements, one position at a time in Python."""
    kl, agree = np.zeros(len(f)), np.zeros(len(f))
    for b in range(f.shape[0]):
        for t in range(f.shape[1] - 1):
            pf = [math.exp(v) for v in f[b, t]]
            pq = [math.exp(v) for v in q[b, t]]
            zf, zq = sum(pf), sum(pq)
            kl[b] += sum(a / zf * math.log((a / zf) / (c / zq)) for a, c in zip(pf, pq))
            agree[b] += int(np.argmax(f[b, t]) == np.argmax(q[b, t]))
    return kl, agree


def test_kl_and_top1_match_a_direct_computation():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 6, 11)).astype(np.float32) * 2
    q = f + rng.normal(size=f.shape).astype(np.float32) * 0.5
    kl, agree = next_token_fidelity(f, q)
    want_kl, want_agree = _direct_kl_top1(f, q)
    assert kl == pytest.approx(want_kl, rel=1e-5)
    assert np.array_equal(agree, want_agree) and 0 < agree.sum() < 15
    kl_chunked, agree_chunked = next_token_fidelity(f, q, chunk_elements=11)   # one position a chunk
    assert kl_chunked == pytest.approx(kl, rel=1e-12) and np.array_equal(agree_chunked, agree)
    same_kl, same_agree = next_token_fidelity(f, f)
    assert np.abs(same_kl).max() < 1e-9 and np.array_equal(same_agree, np.full(3, 5.0))


def test_sequence_nll_adds_up_to_nll_sum():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 7, 9)).astype(np.float32)
    ids = rng.integers(0, 9, size=(4, 7))
    total, count = nll_sum_and_count(logits, ids)
    assert sequence_nll(logits, ids).sum() == pytest.approx(total, rel=1e-12) and count == 24


def test_bootstrap_of_identical_sequences_is_a_point():
    cols = np.tile([[2.0, 4.0]], (20, 1))
    assert bootstrap_interval(cols, lambda s: s[:, 0] / s[:, 1]) == pytest.approx((0.5, 0.5))


def test_bootstrap_of_a_mean_matches_the_normal_interval_and_is_seeded():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=400)
    cols = np.stack([x, np.ones_like(x)], axis=1)
    lo, hi = bootstrap_interval(cols, lambda s: s[:, 0] / s[:, 1], resamples=4000, seed=0)
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)
    assert bootstrap_interval(cols, lambda s: s[:, 0] / s[:, 1], resamples=4000, seed=0) == (lo, hi)
    assert bootstrap_interval(cols, lambda s: s[:, 0] / s[:, 1], resamples=4000, seed=1) != (lo, hi)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="N >= 1"):
        bootstrap_interval(np.zeros((0, 2)), lambda s: s[:, 0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.ones((3, 2)), lambda s: s[:, 0], level=1.5)


def test_fidelity_summary_of_a_model_against_itself_and_a_perturbed_one():
    """Lockstep evaluation on tiny logits functions: the float model against itself is 0% / 0 KL
    / 100% top-1 exactly; a perturbed one is worse on every figure, with intervals around it."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=(50, 50)).astype(np.float32) * 3        # a bigram "model"

    def float_logits(ids):
        return table[ids]

    def noisy_logits(ids):
        return table[ids] + np.sin(ids[..., None] * np.arange(50)).astype(np.float32)

    ids = rng.integers(0, 50, size=(12, 10))
    same = fidelity_summary(fidelity_columns(float_logits, ids, batch_size=5, float_logits=float_logits))
    assert same["vs_float_pct"] == 0 and same["kl"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1
    assert same["tokens"] == 12 * 9 and same["sequences"] == 12 and same["perplexity"] == same["float_perplexity"]
    r = fidelity_summary(fidelity_columns(noisy_logits, ids, batch_size=5, float_logits=float_logits))
    total, count = nll_sum_and_count(noisy_logits(ids), ids)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)
    assert r["kl"] > 0.01 and r["top1"] < 1
    for key in ("vs_float_pct", "kl", "top1"):
        lo, hi = r[f"{key}_ci"]
        assert lo <= r[key] <= hi and lo < hi, key


def test_top_k_reference_is_exact_at_full_k_and_a_lower_bound_below():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(3, 6, 40)).astype(np.float32) * 2
    q = f + rng.normal(size=f.shape).astype(np.float32) * 0.7
    kl, agree = next_token_fidelity(f, q)
    ids, logp = float_top_k(f, 40)
    assert np.array_equal(ids[..., 0], f[:, :-1].argmax(-1)) and (np.diff(logp, axis=-1) <= 0).all()
    full_kl, full_agree = top_k_fidelity(q, ids, logp)
    assert full_kl == pytest.approx(kl, rel=1e-4) and np.array_equal(full_agree, agree)
    for k in (1, 5, 20):
        kk, ka = top_k_fidelity(q, *float_top_k(f, k))
        assert (kk <= kl + 1e-9).all() and (kk >= 0).all() and np.array_equal(ka, agree), k
    with pytest.raises(ValueError, match="reference of shape"):
        top_k_fidelity(q[:2], ids, logp)


def test_cached_reference_columns_match_lockstep_ones():
    rng = np.random.default_rng(5)
    table = rng.normal(size=(30, 30)).astype(np.float32) * 3

    def float_logits(ids):
        return table[ids]

    def noisy_logits(ids):
        return table[ids] + np.cos(ids[..., None] * np.arange(30)).astype(np.float32)

    ids = rng.integers(0, 30, size=(7, 9))
    exact = fidelity_columns(noisy_logits, ids, 3, float_logits=float_logits)
    cached = fidelity_columns(noisy_logits, ids, 3, reference=float_reference(float_logits, ids, 3, k=30))
    assert cached == pytest.approx(exact, rel=1e-4)
    coarse = fidelity_columns(noisy_logits, ids, 3, reference=float_reference(float_logits, ids, 3, k=4))
    assert np.array_equal(coarse[:, [0, 1, 3, 4]], exact[:, [0, 1, 3, 4]]) and (coarse[:, 2] <= exact[:, 2] + 1e-9).all()
    with pytest.raises(ValueError, match="either float_logits"):
        fidelity_columns(noisy_logits, ids, 3)

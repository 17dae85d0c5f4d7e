"""Sequences are deterministic fixed-length windows; perplexity matches a hand computation."""

import math

import numpy as np
import pytest
import torch

from simulation.models import ByteTokenizer, tiny_llama, tiny_qwen2
from simulation.sequences import (
    nll_sum_and_count,
    perplexity,
    perplexity_from_logits,
    random_token_sequences,
    to_sequences,
)

TEXTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind",
         "to suffer the slings and arrows of outrageous fortune"]


def test_to_sequences_concatenates_with_eos_and_drops_tail():
    tok = ByteTokenizer()
    seqs = to_sequences(TEXTS, tok, seq_len=16)
    stream = []
    for t in TEXTS:
        stream += list(t.encode()) + [tok.eos_token_id]
    n = len(stream) // 16
    assert seqs.dtype == torch.long and seqs.shape == (n, 16)
    assert seqs.flatten().tolist() == stream[: n * 16]
    assert torch.equal(seqs, to_sequences(TEXTS, tok, seq_len=16))


def test_to_sequences_max_and_too_little_text():
    tok = ByteTokenizer()
    assert to_sequences(TEXTS, tok, 8, max_sequences=3).shape == (3, 8)
    assert torch.equal(to_sequences(TEXTS, tok, 8, max_sequences=3), to_sequences(TEXTS, tok, 8)[:3])
    assert to_sequences(["ab"], tok, 8).shape == (0, 8)
    with pytest.raises(ValueError):
        to_sequences(TEXTS, tok, 1)


def test_random_token_sequences_deterministic():
    a = random_token_sequences(257, 4, 32, seed=0)
    assert a.shape == (4, 32) and a.dtype == torch.long and 0 <= a.min() and a.max() < 257
    assert torch.equal(a, random_token_sequences(257, 4, 32, seed=0))
    assert not torch.equal(a, random_token_sequences(257, 4, 32, seed=1))


def test_nll_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, size=(2, 5))
    expected = 0.0
    for b in range(2):
        for t in range(4):
            row = logits[b, t].astype(np.float64)
            expected += math.log(np.exp(row).sum()) - row[ids[b, t + 1]]
    total, count = nll_sum_and_count(logits, ids)
    assert count == 8 and total == pytest.approx(expected, rel=1e-6)
    assert perplexity_from_logits(logits, ids) == pytest.approx(math.exp(expected / 8), rel=1e-6)
    # torch tensors give the same answer
    assert nll_sum_and_count(torch.from_numpy(logits), torch.from_numpy(ids))[0] == total


def test_nll_is_stable_for_large_logits():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[..., 0] = 1e4
    total, _ = nll_sum_and_count(logits, np.zeros((1, 3), np.int64))
    assert total == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_perplexity_equals_torch_cross_entropy(build):
    model = build(seed=0)
    seqs = to_sequences(TEXTS * 4, ByteTokenizer(), seq_len=32)
    with torch.no_grad():
        logits = model(input_ids=seqs).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), seqs[:, 1:].reshape(-1))
    ppl = perplexity(model, seqs, batch_size=3)
    assert ppl == pytest.approx(math.exp(ce.item()), rel=1e-5)
    # random init: close to uniform over the 257-token vocabulary
    assert 150 < ppl < 400


def test_perplexity_restores_training_mode():
    model = tiny_llama().train()
    perplexity(model, random_token_sequences(257, 2, 8, seed=0))
    assert model.training

"""Sequences are deterministic fixed-length windows; perplexity matches a hand computation."""

import math

import numpy as np
import pytest
import torch

from simulation.models import ByteTokenizer, tiny_llama, tiny_qwen2
from simulation.sequences import (
    bos_to_prepend,
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


def _bos_tokenizer(adds_bos: bool):
    """A real (tiny) Hugging Face fast tokenizer, character-level, that puts <bos> before a text
    when asked to add special tokens -- as Llama-style and Gemma tokenizers do -- or not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ,.:'"):
        vocab[c] = 3 + i
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if adds_bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def test_bos_is_prepended_to_every_window_when_the_tokenizer_adds_one():
    tok = _bos_tokenizer(adds_bos=True)
    assert bos_to_prepend(tok) == 0
    texts = [t.lower() for t in TEXTS]
    seqs = to_sequences(texts, tok, seq_len=12)
    stream = []
    for t in texts:
        stream += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    n = len(stream) // 11                       # 11 text tokens after each BOS
    assert seqs.shape == (n, 12)
    assert (seqs[:, 0] == 0).all()
    assert seqs[:, 1:].flatten().tolist() == stream[: n * 11]
    assert to_sequences(texts, tok, seq_len=12, max_sequences=2).shape == (2, 12)


def test_no_bos_when_the_tokenizer_adds_none():
    plain = _bos_tokenizer(adds_bos=False)      # has a BOS token, but does not put it before texts
    assert plain.bos_token_id == 0 and bos_to_prepend(plain) is None
    assert bos_to_prepend(ByteTokenizer()) is None
    seqs = to_sequences([t.lower() for t in TEXTS], plain, seq_len=12)
    assert 0 not in seqs.flatten().tolist()

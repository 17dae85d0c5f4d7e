"""Token sequences for calibration and evaluation, and perplexity.

Perplexity has one definition, `nll_sum_and_count`, over numpy logits, so the torch model here
and a runtime that returns numpy logits (ONNX Runtime on a client) compute the same number.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from quant.metrics import nll_sum_and_count, perplexity_from_logits  # noqa: F401 (re-exported)


def to_sequences(texts, tokenizer, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """LongTensor [N, seq_len]: the texts, each followed by the tokenizer's EOS as separator,
    tokenized and cut into non-overlapping windows; the incomplete tail is dropped.
    Works with a Hugging Face tokenizer or `ByteTokenizer`; stops early at max_sequences."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one token predicts the next), got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate texts")
    need = None if max_sequences is None else max_sequences * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def random_token_sequences(vocab_size: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """LongTensor [n, seq_len] of uniform random token ids: the "random representative dataset"
    calibration recipe, kept as a baseline to beat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq_len), generator=g, dtype=torch.long)


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp of the mean next-token cross-entropy over all predicted tokens of all sequences.
    Runs the model in eval mode and restores its previous mode."""
    if sequences.ndim != 2 or sequences.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, T] tensor, got shape {tuple(sequences.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        n_batches = (len(sequences) + batch_size - 1) // batch_size
        for b, start in enumerate(range(0, len(sequences), batch_size)):
            batch = sequences[start : start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            s, c = nll_sum_and_count(logits, batch)
            total, count = total + s, count + c
            if progress:
                print(f"perplexity: batch {b + 1}/{n_batches}", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    return float(np.exp(total / count))

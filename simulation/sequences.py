"""Token sequences for calibration and evaluation, and perplexity.

Perplexity has one definition, `nll_sum_and_count`, over numpy logits, so the torch model here
and a runtime that returns numpy logits (ONNX Runtime on a client) compute the same number.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from quant.metrics import nll_sum_and_count, perplexity_from_logits  # noqa: F401 (re-exported)


def bos_to_prepend(tokenizer) -> int | None:
    """The BOS id when the model's tokenizer puts one before a text (Hugging Face's
    ``add_special_tokens=True``; for a GGUF, transformers reads ``tokenizer.ggml.add_bos_token``),
    else None. A model trained with a BOS scores far worse without it (issue 19: a 262k-vocabulary
    model, float perplexity 598 without, 111 with); SmolLM2's tokenizer adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True)
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def token_stream(texts, tokenizer, limit: int | None = None) -> list[int]:
    """The texts tokenized without special tokens, each followed by the tokenizer's EOS as
    separator; stops once ``limit`` ids are collected."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate texts")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(eos)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def to_sequences(texts, tokenizer, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """LongTensor [N, seq_len]: the texts, each followed by the tokenizer's EOS as separator,
    tokenized and cut into non-overlapping windows; the incomplete tail is dropped. When the
    tokenizer adds a BOS (``bos_to_prepend``) every window starts with it and holds seq_len - 1
    text tokens, as the model saw documents in training. Works with a Hugging Face tokenizer or
    `ByteTokenizer`; stops early at max_sequences."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one token predicts the next), got {seq_len}")
    bos = bos_to_prepend(tokenizer)
    width = seq_len - (bos is not None)
    if width < 1:
        raise ValueError(f"seq_len {seq_len} leaves no text token after the BOS")
    ids = token_stream(texts, tokenizer, None if max_sequences is None else max_sequences * width)
    n = len(ids) // width
    if max_sequences is not None:
        n = min(n, max_sequences)
    windows = torch.tensor(ids[: n * width], dtype=torch.long).reshape(n, width)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


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

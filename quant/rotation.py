"""The Hadamard rotation of Linear inputs and weights (QuaRot's online Hadamard: Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024; Chee et al., QuIP, 2023).

A per-token input's scale is set by the token's largest channel, so on SmolLM2's tokens with
massive activations every other channel of a ``down_proj`` input rounds to zero. Rotating first,
``x R`` with ``R = D blockdiag(H_b)`` (random signs ``D``, normalized Sylvester-Hadamard blocks
``H_b``), spreads one channel's outlier over the ``b`` channels of its block; ``R`` is orthogonal,
so the Linear computes the same float product as ``(x R) (W R)^T`` and quantizes ``x R`` per token
and ``W R`` per output channel. On SmolLM2's default run the 30 ``down_proj`` inputs alone
(everything else at int16: ``bench/ood_gap.py``'s control row) cost KL 0.016-0.019 nats per token
to the float model smoothed, 0.002 rotated.

The rotation costs ``b`` multiply-adds per input element at run time (128 here: 5.6% of a
SmolLM2 layer's Linear ones); blocks are the largest power of two dividing the width, at most the block asked
for. Pure numpy (and a torch twin for the instrument) so the server, every device and the export
derive the same bits. ``quant.qdq.per_token_inputs`` writes it into the graph.

A static input (a QParams point: an NPU's per-tensor range) is rotated the same way when its
Linear is listed in the QParams' ``meta["rotated"]`` (``QuantConfig.rotate``): one massive channel
then no longer sets the range every other channel of the tensor is rounded on, and the 4-bit
weights ``(W * m) R`` lose their outlier columns too (QuaRot's argument for weights and
activations alike). ``quant.qdq`` rotates the smoothed input before its QuantizeLinear.
"""

from __future__ import annotations

import numpy as np

ROTATION_META = "per_token_rotation"   # QParams meta: the largest block asked for ("0": none)
SIGN_SEED = 0                          # D's signs: np.random.default_rng([SIGN_SEED, width])


def check_block(block: int) -> int:
    """``block`` if it is 0 (no rotation) or a power of two of at least 2; else ValueError."""
    if not isinstance(block, int) or block < 0 or (block and (block < 2 or block & (block - 1))):
        raise ValueError(f"a rotation block is 0 (none) or a power of two >= 2, got {block!r}")
    return block


def block_for(width: int, block: int) -> int:
    """The block a ``width``-channel input is rotated in: the largest power of two that divides
    ``width``, at most ``block``; 0 (not rotated) when that is 1 or ``block`` is 0."""
    b = min(check_block(block), width & -width) if block else 0
    return b if b >= 2 else 0


def hadamard(b: int) -> np.ndarray:
    """The normalized Sylvester-Hadamard matrix of order ``b`` (a power of two): symmetric and
    orthogonal, float64."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != b:
        raise ValueError(f"Sylvester-Hadamard orders are powers of two, got {b}")
    return h / np.sqrt(b)


def signs(width: int) -> np.ndarray:
    """``D``'s diagonal for a ``width``-channel input: float32 +-1, the same on every machine."""
    return np.where(np.random.default_rng([SIGN_SEED, width]).random(width) < 0.5, -1.0, 1.0).astype(np.float32)


def rotate(a, block: int, inverse: bool = False) -> np.ndarray:
    """``a R`` along the last axis (an input ``x`` or a weight ``W`` of shape (out, in)), float32,
    summed in float64 so that ``rotate_torch`` gives the same float32 bits; ``a`` itself (as
    float32) when ``block_for`` gives 0. ``inverse``: ``a R^T`` (``R`` is orthogonal and ``H_b``
    symmetric, so ``R^T = blockdiag(H_b) D``), a rotated weight row back in the input's channels
    (the tied embedding reads a per-token lm_head's rows so: ``quant.qdq.embedding_table``)."""
    a = np.asarray(a, dtype=np.float32)
    n = a.shape[-1]
    b = block_for(n, block)
    if not b:
        return a
    d = signs(n)
    y = a.astype(np.float64) if inverse else a.astype(np.float64) * d
    y = y.reshape(*a.shape[:-1], n // b, b) @ hadamard(b)
    y = y.reshape(a.shape)
    return (y * d if inverse else y).astype(np.float32)


def rotate_torch(x, block: int, inverse: bool = False):
    """``rotate`` for a torch tensor (the instrument's forward and tied embedding), differentiable,
    in ``x``'s dtype."""
    import torch

    n = x.shape[-1]
    b = block_for(n, block)
    if not b:
        return x
    d = torch.as_tensor(signs(n), dtype=torch.float64, device=x.device)
    h = torch.as_tensor(hadamard(b), dtype=torch.float64, device=x.device)
    y = x.double() if inverse else x.double() * d
    y = (y.reshape(*x.shape[:-1], n // b, b) @ h).reshape(x.shape)
    return (y * d if inverse else y).to(x.dtype)


def rotation_of(meta: dict) -> int:
    """The block asked for by a QParams' meta (``ROTATION_META``); 0 when absent."""
    raw = meta.get(ROTATION_META)
    if raw in (None, ""):
        return 0
    try:
        return check_block(int(raw))
    except (TypeError, ValueError):
        raise ValueError(f"meta[{ROTATION_META!r}] must be 0 or a power of two >= 2, got {raw!r}") from None

"""quant.rotation: the block Hadamard rotation of per-token inputs (QuaRot's online Hadamard)."""

import json

import numpy as np
import pydantic
import pytest
import torch

from quant.qparams import QParams, qparams_problems, rotation_block
from quant.rotation import block_for, check_block, hadamard, rotate, rotate_torch, rotation_of, signs


def test_the_rotation_is_orthogonal_and_the_same_bits_in_numpy_and_torch():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 192)).astype(np.float32)
    x = rng.standard_normal((3, 192)).astype(np.float32)
    assert block_for(192, 128) == 64                   # the largest power of two dividing 192
    h = hadamard(64)
    np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-12)
    wr, xr = rotate(w, 128), rotate(x, 128)
    np.testing.assert_allclose(xr @ wr.T, x @ w.T, atol=1e-4)   # the same float product
    assert not np.allclose(wr, w)
    np.testing.assert_array_equal(rotate_torch(torch.from_numpy(w), 128).numpy(), wr)
    np.testing.assert_array_equal(signs(192), signs(192))       # fixed, not drawn per call
    assert set(np.unique(signs(192))) == {-1.0, 1.0}
    np.testing.assert_array_equal(rotate(w, 0), w)
    # inverse=True undoes it (a rotated weight's rows back in the input's channels), in both
    np.testing.assert_allclose(rotate(wr, 128, inverse=True), w, atol=1e-5)
    np.testing.assert_allclose(rotate(rotate(w, 128, inverse=True), 128), w, atol=1e-5)
    assert not np.allclose(rotate(w, 128, inverse=True), wr)     # not the forward rotation again
    np.testing.assert_array_equal(rotate_torch(torch.from_numpy(wr), 128, inverse=True).numpy(),
                                  rotate(wr, 128, inverse=True))
    np.testing.assert_array_equal(rotate(w, 0, inverse=True), w)


def test_blocks_and_refusals():
    assert block_for(1536, 128) == 128 and block_for(576, 128) == 64 and block_for(4864, 128) == 128
    assert block_for(1536, 0) == 0 and block_for(7, 128) == 0 and block_for(10, 128) == 2
    for bad in (3, 100, -2, 1):
        with pytest.raises(ValueError, match="power of two"):
            check_block(bad)
    with pytest.raises(ValueError, match="per_token_rotation"):
        rotation_of({"per_token_rotation": "96"})
    assert rotation_of({}) == 0 and rotation_of({"per_token_rotation": "128"}) == 128


def _per_token(x):
    s = np.abs(x).max(-1, keepdims=True) / 127
    return np.round(x / s) * s


def test_a_massive_channel_no_longer_rounds_the_others_away():
    """Why it exists: a token whose one channel is 1000x the others. Per token, its other channels
    round to zero; rotated, the outlier is spread over the block and the product keeps them."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1536)).astype(np.float32)
    x[:, 3] = 1000.0
    w = (rng.standard_normal((64, 1536)) / 40).astype(np.float32)
    w[:, 3] = 1e-4                          # the model reads the outlier channel barely (an attention sink)
    ref = x @ w.T
    plain = _per_token(x) @ w.T
    rotated = _per_token(rotate(x, 128)) @ rotate(w, 128).T
    err_plain, err_rot = np.abs(plain - ref).mean(), np.abs(rotated - ref).mean()
    assert err_rot < err_plain / 5, (err_rot, err_plain)


def test_config_and_meta_carry_the_block():
    from simulation.config import FleetEntry, quant_config_for

    with pytest.raises(pydantic.ValidationError, match="per_token_rotation"):
        FleetEntry(profile="int8", per_token=["*.down_proj"], per_token_rotation=100)
    on = FleetEntry(profile="int8", per_token=["*.down_proj"])
    assert quant_config_for(on.load(), on).per_token_rotation == 128
    off = FleetEntry(profile="int8")
    assert quant_config_for(off.load(), off).per_token_rotation == 0   # nothing per token, nothing rotated
    meta = {"per_token": json.dumps(["a.down_proj"]), "per_token_rotation": "128"}
    qp = QParams({}, "m", 1, {}, meta)
    assert rotation_block(qp, "a.down_proj") == 128 and rotation_block(qp, "a.up_proj") == 0
    held = QParams({}, "m", 0, {}, {**meta, "per_token_rotation": "64"})
    assert any("rotation block 128 differs" in e for e in qparams_problems(qp, held))
    assert not qparams_problems(qp, QParams({}, "m", 0, {}, dict(meta)))


def test_the_instrument_records_and_checks_the_block():
    from quant.instrument import QuantConfig, get_qparams, quantize_, set_qparams
    from simulation.models import tiny_llama

    rotated, plain = tiny_llama(), tiny_llama()
    quantize_(rotated, QuantConfig(per_token=["*.down_proj"], per_token_rotation=64))
    quantize_(plain, QuantConfig(per_token=["*.down_proj"]))
    qp = get_qparams(rotated)
    assert rotation_of(qp.meta) == 64 and rotation_of(get_qparams(plain).meta) == 0
    down = next(k for k in qp.points if k.endswith("down_proj:weight"))
    assert not np.array_equal(qp.points[down].scale, get_qparams(plain).points[down].scale)   # W R's ranges
    with pytest.raises(ValueError, match="rotation block 64 differs from the model's 0"):
        set_qparams(plain, qp)
    set_qparams(rotated, qp)

"""How a device stores its 8-bit weights (design.md section 3): int8 with zero point 0 where ONNX
Runtime's u8 x s8 kernel is exact (x86 with VNNI, Arm), uint8 (q + 128) where it saturates (x86
without VNNI: vpmaddubsw adds two u8 x s8 products into a saturating int16). The adversarial case
below overflows int16 in every pair, so on a CPU without VNNI the int8 form is wrong by half the
sum: if the CPU rule ever picks int8 there, ``test_overflow_case_is_exact_in_the_chosen_form``
fails on that machine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from client.runtime import choose_weight_storage, ort_session, u8s8_saturates
from quant.qdq import count_matmuls, set_weight_storage, u8_storable

M, K, N = 8, 64, 16
S_X, S_W = np.float32(0.05), np.linspace(0.01, 0.02, N).astype(np.float32)


def one_linear(qw: np.ndarray) -> onnx.ModelProto:
    """x -> QuantizeLinear (uint8, z = 0) -> DequantizeLinear -> MatMul <- DequantizeLinear(int8
    per-channel weight, z = 0): the shape of every Linear in fedquant's QDQ model."""
    inits = [numpy_helper.from_array(S_X, "x.scale"), numpy_helper.from_array(np.uint8(0), "x.zero_point"),
             numpy_helper.from_array(qw.astype(np.int8), "w.q"), numpy_helper.from_array(S_W, "w.scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w.zero_point")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero_point"], ["x.q"]),
             helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zero_point"], ["x.dq"]),
             helper.make_node("DequantizeLinear", ["w.q", "w.scale", "w.zero_point"], ["w.dq"], axis=1),
             helper.make_node("MatMul", ["x.dq", "w.dq"], ["y"])]
    g = helper.make_graph(nodes, "one_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def adversarial():
    """Activations at 255 and weight columns at -127/127: every adjacent pair of products is
    +-64770, outside int16. Half the rows and columns random, so the case is not all extremes."""
    rng = np.random.default_rng(0)
    qx = rng.integers(0, 256, (M, K)).astype(np.int64)
    qx[: M // 2] = 255
    qw = rng.integers(-127, 128, (K, N)).astype(np.int64)
    qw[:, : N // 2] = np.where(np.arange(N // 2) % 2 == 0, -127, 127)
    return qx, qw


def exact(qx, qw) -> np.ndarray:
    """MatMulIntegerToFloat's arithmetic: an exact int32 sum, one float32 multiply by s_x * s_w."""
    return (qx @ qw).astype(np.float32) * (S_X * S_W)


def pmaddubsw_emulated(qx, qw) -> np.ndarray:
    """x86 without VNNI: products of adjacent k pairs summed into a saturating int16, then the
    pairs summed in int32 (what MLAS's AVX2 u8 x s8 kernel computes)."""
    p = qx[:, :, None] * qw[None, :, :]                      # (M, K, N)
    pairs = np.clip(p[:, 0::2] + p[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1).astype(np.float32) * (S_X * S_W)


def test_choice_by_cpu():
    assert choose_weight_storage("auto", "x86_64", {"avx2", "fma"}) == "uint8"
    assert choose_weight_storage("auto", "x86_64", {"avx2", "avx512f", "avx512bw"}) == "uint8"
    assert choose_weight_storage("auto", "x86_64", {"avx2", "avx512f", "avx512_vnni"}) == "int8"
    assert choose_weight_storage("auto", "x86_64", {"avx2", "avx_vnni"}) == "int8"
    assert choose_weight_storage("auto", "AMD64", set()) == "uint8"          # flags unknown: exact
    assert choose_weight_storage("auto", "aarch64", {"asimd", "asimddp"}) == "int8"
    assert choose_weight_storage("uint8", "aarch64", set()) == "uint8"
    with pytest.raises(ValueError):
        choose_weight_storage("int4")


def test_the_case_overflows_int16():
    """The test input is adversarial: the non-VNNI kernel's arithmetic gets it wrong."""
    qx, qw = adversarial()
    ref, sat = exact(qx, qw), pmaddubsw_emulated(qx, qw)
    assert np.abs(sat - ref).max() > 0.25 * np.abs(ref).max()
    assert np.array_equal(pmaddubsw_emulated(qx % 64, qw % 64 - 32), exact(qx % 64, qw % 64 - 32))


def test_set_weight_storage_round_trip():
    _, qw = adversarial()
    mp = one_linear(qw)
    assert u8_storable(mp) == [("w.q", "w.zero_point")]
    before = {t.name: t.SerializeToString() for t in mp.graph.initializer}
    assert set_weight_storage(mp, True) == 1 and set_weight_storage(mp, True) == 0
    a = {t.name: numpy_helper.to_array(t) for t in mp.graph.initializer}
    assert a["w.q"].dtype == np.uint8 and np.array_equal(a["w.q"].astype(np.int64) - 128, qw)
    assert np.all(a["w.zero_point"] == 128)
    assert set_weight_storage(mp, False) == 1
    assert {t.name: t.SerializeToString() for t in mp.graph.initializer} == before


def test_overflow_case_is_exact_in_the_chosen_form(tmp_path):
    """Both forms run as ORT's integer kernel; uint8 storage is exact on every CPU, and so is the
    form this CPU's rule picks (``auto``). int8 storage is exact here unless the rule says the
    kernel saturates: a CPU where it is not exact and the rule picked int8 fails this test."""
    qx, qw = adversarial()
    mp = one_linear(qw)
    x = {"x": (qx * S_X).astype(np.float32)}
    ref = exact(qx, qw)
    tol = 1e-6 * np.abs(ref).max()
    got = {}
    for form in ("uint8", "int8", "auto"):
        opt = tmp_path / f"{form}.opt.onnx"
        sess = ort_session(mp, optimized_path=opt, weight_storage=form)
        assert count_matmuls(onnx.load(opt)) == {"MatMulIntegerToFloat": 1}, form
        got[form] = sess.run(None, x)[0]
    err = {f: float(np.abs(y - ref).max()) for f, y in got.items()}
    print(f"\nsaturates here: {u8s8_saturates()}, max error by form: {err} (tolerance {tol:.2e})")
    assert err["uint8"] <= tol and err["auto"] <= tol
    if err["int8"] > tol:
        assert u8s8_saturates(), "ORT's u8 x s8 kernel saturates on this CPU but the rule picks int8"
        assert np.allclose(got["int8"], pmaddubsw_emulated(qx, qw), rtol=1e-5)

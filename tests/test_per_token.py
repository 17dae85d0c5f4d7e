"""Per-token inputs (``quant.qdq.per_token_inputs``): a Linear whose input is quantized per token
at run time runs ONNX Runtime's MatMulInteger, and its arithmetic is exactly the per-token
formula in the weight storage the CPU's runtime picks (int8, or uint8 where u8 x s8 saturates)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from client.runtime import choose_weight_storage, ort_session
from quant.export import LINEAR_TAG
from quant.qdq import count_matmuls, per_token_inputs, set_weight_storage

M, K, N = 6, 64, 16
S_W = np.linspace(0.01, 0.02, N).astype(np.float32)


def one_linear(qw: np.ndarray, s_x: float) -> onnx.ModelProto:
    """x -> Q (uint8, static s_x, z = 128) -> DQ -> MatMul <- DQ(int8 per-channel weight): a
    Linear of fedquant's QDQ model, tagged ``lin``."""
    inits = [numpy_helper.from_array(np.float32(s_x), "x.scale"), numpy_helper.from_array(np.uint8(128), "x.zero_point"),
             numpy_helper.from_array(qw.astype(np.int8), "w.q"), numpy_helper.from_array(S_W, "w.scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w.zero_point")]
    mm = helper.make_node("MatMul", ["x.dq", "w.dq"], ["y"], name="lin/MatMul")
    mm.metadata_props.add(key=LINEAR_TAG, value="lin")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero_point"], ["x.q"]),
             helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zero_point"], ["x.dq"]),
             helper.make_node("DequantizeLinear", ["w.q", "w.scale", "w.zero_point"], ["w.dq"], axis=1), mm]
    g = helper.make_graph(nodes, "one_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def case():
    """Rows of ordinary activations and one token with a massive outlier (x1000 in one channel),
    the shape of the down_proj inputs that static 8-bit ranges clip."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (M, K)).astype(np.float32)
    x[2, 7] = 1000.0
    qw = rng.integers(-127, 128, (K, N))
    return x, qw


def per_token_formula(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``s_t = max|x_t| / 127``, ``q = round(x / s_t)`` (half to even), an exact integer sum, then
    ``* s_t * s_w`` in float32: what the rewritten graph must compute."""
    s = np.maximum(np.abs(x).max(axis=1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    q = np.clip(np.rint(x / s), -128, 127).astype(np.int64)
    return ((q @ qw).astype(np.float32) * s) * S_W


def test_per_token_is_exact_in_the_chosen_storage(tmp_path):
    x, qw = case()
    static_s = float(np.abs(x).max()) / 127        # a static range that covers the outlier
    mp = one_linear(qw, static_s)
    u8 = choose_weight_storage() == "uint8"
    set_weight_storage(mp, u8)
    static = ort_session(mp).run(["y"], {"x": x})[0]
    assert per_token_inputs(mp, ["lin"]) == ["lin"]
    onnx.checker.check_model(mp)
    assert not {"x.scale", "x.zero_point"} & {t.name for t in mp.graph.initializer}
    opt = tmp_path / "opt.onnx"
    got = ort_session(mp, optimized_path=opt).run(["y"], {"x": x})[0]
    assert count_matmuls(onnx.load(opt)) == {"MatMulInteger": 1}
    np.testing.assert_array_equal(got, per_token_formula(x, qw))
    # the static range that covers the outlier rounds every other token to a few levels; per token
    # they keep 8 bits: their error vs the float product is far smaller
    exact = x @ (qw.astype(np.float32) * S_W)
    rows = [r for r in range(M) if r != 2]
    assert np.abs(got - exact)[rows].max() * 10 < np.abs(static - exact)[rows].max()


def test_refuses_what_it_cannot_rewrite():
    x, qw = case()
    mp = one_linear(qw, 0.1)
    with pytest.raises(ValueError, match="nope: not a QDQ Linear"):
        per_token_inputs(mp, ["nope"])
    mp.graph.node[2].attribute[0].i = 0       # weight DQ along the input axis: not per output channel
    with pytest.raises(ValueError, match="lin: per-token inputs need weights per tensor or per output channel"):
        per_token_inputs(mp, ["lin"])
    assert [n.op_type for n in mp.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]


# ------------------------------------------------------------------ QuantConfig.per_token (torch side)

def test_per_token_config_in_the_instrument():
    import json

    import torch

    from quant.instrument import (PerTokenQuantizer, QuantConfig, get_qparams, per_token_fake_quant,
                                  per_token_paths, quant_points, quantize_, set_mode)
    from quant.qparams import PointParams, QParams, per_token_linears, qparams_problems
    from quant.spec import activation_spec
    from simulation.models import tiny_llama

    m = tiny_llama()
    quantize_(m, QuantConfig(per_token=["*.down_proj"]))
    downs = per_token_paths(m)
    assert downs and all(p.endswith("mlp.down_proj") for p in downs)
    assert not [k for k in quant_points(m) if k.endswith("down_proj:input")]
    assert all(f"{p}:weight" in quant_points(m) for p in downs)
    qp = get_qparams(m)
    assert json.loads(qp.meta["per_token"]) == downs == per_token_linears(qp)
    # the quantizer follows the activations' mode: identity in float, per token otherwise
    q = m.get_submodule(downs[0]).input_quantizer
    assert isinstance(q, PerTokenQuantizer) and q.mode == "float"
    x = torch.randn(2, 5, q_in := m.get_submodule(downs[0]).in_features)
    x[0, 1, 3] = 500.0
    assert torch.equal(q(x), x)
    set_mode(m, "quant", "weights")
    assert q.mode == "float"
    set_mode(m, "float", "activations")   # float activations stay float (no range needed)
    q.mode = "quant"
    y = q(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(y, torch.round(x / s) * s) and torch.equal(y, per_token_fake_quant(x))
    assert (y - x).abs().max() <= s.max() / 2 + 1e-6 and q_in > 0
    xg = x.clone().requires_grad_(True)       # straight-through: the gradient passes unchanged
    per_token_fake_quant(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    # a point and a per-token input at once, or another graph's per-token list, are refused
    bad = QParams(dict(qp.points), qp.model, qp.version, qp.smoothing,
                  {**qp.meta, "per_token": json.dumps(downs + ["model.layers.0.mlp.up_proj"])})
    up = PointParams(activation_spec(8), np.float32(0.1), np.uint8(0))
    with pytest.raises(ValueError, match="quantized per token and also has a point"):
        QParams({"model.layers.0.mlp.up_proj:input": up}, meta={"per_token": json.dumps(["model.layers.0.mlp.up_proj"])}
                ).validate()
    assert any("per-token inputs" in e for e in qparams_problems(bad, qp))
    with pytest.raises(ValueError, match="must be a JSON list"):
        per_token_linears(QParams({}, meta={"per_token": "down_proj"}))


def test_per_token_config_refusals():
    from quant.instrument import QuantConfig, quantize_
    from quant.spec import weight_spec
    from simulation.models import tiny_llama

    with pytest.raises(ValueError, match="per_token takes module patterns"):
        QuantConfig(per_token=["*.down_proj:input"])
    with pytest.raises(ValueError, match="matches no quantized nn.Linear"):
        quantize_(tiny_llama(), QuantConfig(per_token=["*.nope"]))
    with pytest.raises(ValueError, match="down_proj: a per-token input needs an int8 weight"):
        quantize_(tiny_llama(), QuantConfig(per_token=["*.down_proj"], weight=weight_spec(4, 32)))
    with pytest.raises(ValueError, match="matches no quantized nn.Linear"):   # skipped Linears are float
        quantize_(tiny_llama(), QuantConfig(per_token=["*.down_proj"], skip=["*.down_proj"]))

"""Fake quantizers attached to tiny Llama and Qwen2 models (quant/instrument.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.affine import fake_quant, range_to_qparams
from quant.instrument import (FakeQuantizer, QuantConfig, QuantLinear, QuantMatMul, capture_inputs,
                              fingerprint, get_qparams, learned_parameters, quant_points, quantize_,
                              set_mode, set_qparams)
from quant.lsq import to_qparams
from quant.qparams import PointParams, load_qparams, save_qparams
from quant.spec import activation_spec, weight_spec
from simulation.models import tiny_llama, tiny_qwen2

torch.set_num_threads(1)

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
VOCAB = 257


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param


def _ids(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _calibrate(model, ids):
    """Min-max activation qparams from one float forward (the test's own tiny calibrator)."""
    ranges = {}

    def track(key, x):
        lo, hi = ranges.get(key, (np.inf, -np.inf))
        ranges[key] = (min(lo, float(x.min())), max(hi, float(x.max())))

    set_mode(model, "float", "activations")
    with capture_inputs(model, track), torch.no_grad():
        model(ids)
    points = quant_points(model)
    for key, (lo, hi) in ranges.items():
        points[key].set_qparams(*range_to_qparams(lo, hi, points[key].spec))
    set_mode(model, "quant")


def _quantized(arch, config=None, calibrate=True):
    model = BUILDERS[arch]()
    quantize_(model, config or QuantConfig())
    if calibrate:
        _calibrate(model, _ids(1))
    return model


def test_two_keys_per_linear(arch):
    model = BUILDERS[arch]()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1          # q k v o gate up down + lm_head
    keys = quantize_(model, QuantConfig())
    assert keys == [f"{n}:{k}" for n in linears for k in ("input", "weight")]
    assert len(keys) == 30 and "model.layers.0.self_attn.q_proj:input" in keys
    assert "lm_head:weight" in keys
    assert set(quant_points(model)) == set(keys)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in linears)


def test_float_mode_is_exactly_the_original(arch):
    model = BUILDERS[arch]()
    ids = _ids()
    ref = _logits(model, ids)
    fp = fingerprint(model)
    quantize_(model, QuantConfig())
    set_mode(model, "float")
    assert torch.equal(_logits(model, ids), ref)
    assert fingerprint(model) == fp


def test_tied_lm_head_is_not_copied():
    model = tiny_llama()
    n_params = sum(p.numel() for p in model.parameters())
    quantize_(model, QuantConfig())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.lm_head.weight_quantizer.scale.shape == (VOCAB,)


def test_activations_start_float_weights_quant(arch):
    model = _quantized(arch, calibrate=False)
    for q in quant_points(model).values():
        assert q.mode == ("quant" if q.kind == "weights" else "float"), q.key
    with pytest.raises(ValueError, match="no qparams yet"):
        set_mode(model, "quant", "activations")


def _check_linear_outputs(model, ids):
    """Each QuantLinear output equals F.linear(fake_quant(x), fake_quant(W), b) with affine math."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    _logits(model, ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 15
    for name, (x, out) in seen.items():
        m = model.get_submodule(name)
        qi, qw = m.input_quantizer, m.weight_quantizer
        assert qi.mode == qw.mode == "quant"
        xq = fake_quant(x, qi.scale.numpy(), qi.zero_point.numpy(), qi.spec)
        wq = fake_quant(m.linear.weight.detach(), qw.scale.numpy(), qw.zero_point.numpy(), qw.spec)
        assert not torch.equal(xq, x) and not torch.equal(wq, m.linear.weight)
        assert torch.equal(out, F.linear(xq, wq, m.linear.bias)), name


def test_quant_mode_is_affine_fake_quant(arch):
    model = _quantized(arch)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    _check_linear_outputs(model, _ids())


def test_per_group_4bit_weights(arch):
    model = _quantized(arch, QuantConfig(weight=weight_spec(4, group_size=32)))
    q = model.model.layers[0].mlp.down_proj.weight_quantizer
    assert q.spec.granularity == "per_group" and q.scale.shape == (64, 128 // 32)
    assert model.lm_head.weight_quantizer.scale.shape == (VOCAB, 2)
    _check_linear_outputs(model, _ids())


def test_group_size_that_does_not_divide_is_refused_untouched():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"q_proj:weight.*group_size 48"):
        quantize_(model, QuantConfig(weight=weight_spec(4, group_size=48)))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_overrides_by_pattern_and_skip():
    a16, w4 = activation_spec(16), weight_spec(4, group_size=32)
    config = QuantConfig(overrides={"*.down_proj:input": a16,
                                    "model.layers.0.mlp.down_proj:weight": w4,
                                    "*.layers.1.*:weight": weight_spec(4, group_size=64)},
                         skip=["lm_head"])
    model = tiny_llama()
    keys = quantize_(model, config)
    assert len(keys) == 28 and isinstance(model.lm_head, nn.Linear)
    points = quant_points(model)
    assert points["model.layers.0.mlp.down_proj:input"].spec == a16
    assert points["model.layers.1.mlp.down_proj:input"].spec == a16
    assert points["model.layers.0.mlp.down_proj:weight"].spec == w4
    assert points["model.layers.1.self_attn.o_proj:weight"].spec.group_size == 64
    assert points["model.layers.0.mlp.up_proj:input"].spec == activation_spec(8)
    assert points["model.layers.0.self_attn.q_proj:weight"].spec == weight_spec(8)
    with pytest.raises(ValueError, match="matches no quantization point"):
        quantize_(tiny_llama(), QuantConfig(overrides={"*.nope:input": a16}))
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        quantize_(tiny_llama(), QuantConfig(skip=["nope"]))
    with pytest.raises(ValueError, match="override keys are"):
        QuantConfig(overrides={"model.layers.0.mlp.down_proj": a16})


def test_qparams_round_trip_through_a_file(arch, tmp_path):
    model = _quantized(arch, QuantConfig(weight=weight_spec(4, group_size=32)))
    ids = _ids()
    ref = _logits(model, ids)
    qp = get_qparams(model)
    assert len(qp.points) == 30 and qp.model == fingerprint(model)
    path = save_qparams(qp, tmp_path / "q.safetensors")
    other = _quantized(arch, QuantConfig(weight=weight_spec(4, group_size=32)), calibrate=False)
    with torch.no_grad():                            # different weights qparams before loading
        other.model.layers[0].mlp.up_proj.weight_quantizer.scale.mul_(2)
    set_qparams(other, load_qparams(path, expect_model=fingerprint(other)))
    assert torch.equal(_logits(other, ids), ref)


def _snapshot(model):
    qp = get_qparams(model)
    return {k: (p.scale.copy(), p.zero_point.copy(), quant_points(model)[k].mode)
            for k, p in qp.points.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(
        np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) and a[k][2] == b[k][2]
        for k in a)


def test_foreign_or_wrong_qparams_are_refused_and_nothing_changes():
    model = _quantized("llama")
    ids = _ids()
    before, logits = _snapshot(model), _logits(model, ids)
    good = get_qparams(model)
    scaled = {k: PointParams(p.spec, p.scale * 2, p.zero_point) for k, p in good.points.items()}

    # The fingerprint covers Linear names and weight shapes: a model of another shape is refused
    # (tiny_llama and tiny_qwen2 have the same ones, so they would not be told apart).
    other = tiny_llama(intermediate_size=96)
    quantize_(other)
    foreign = get_qparams(other)
    with pytest.raises(ValueError, match="QParams are for model"):
        set_qparams(model, foreign)
    unsigned = good.with_points(scaled)
    unsigned.model = ""
    with pytest.raises(ValueError, match="QParams are for model ''"):
        set_qparams(model, unsigned)

    wrong_key = good.with_points({**scaled, "model.layers.9.mlp.up_proj:input":
                                  good.points["model.layers.0.mlp.up_proj:input"]})
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj:input: not a quantization"):
        set_qparams(model, wrong_key)

    k = "model.layers.1.self_attn.o_proj:weight"
    s4, z4 = range_to_qparams(-np.ones((64, 2)), np.ones((64, 2)), weight_spec(4, group_size=32))
    wrong_spec = good.with_points({**scaled, k: PointParams(weight_spec(4, group_size=32), s4, z4)})
    with pytest.raises(ValueError, match=f"{k}: spec s4 sym group32@1 differs"):
        set_qparams(model, wrong_spec)

    bad_smooth = good.with_points(scaled)
    bad_smooth.smoothing = {"model.layers.0.mlp.up_proj": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="smoothing model.layers.0.mlp.up_proj"):
        set_qparams(model, bad_smooth)

    assert _same(_snapshot(model), before)
    assert torch.equal(_logits(model, ids), logits)

    # not strict: unknown keys are ignored, the known ones load
    set_qparams(model, wrong_key, strict=False)
    assert np.array_equal(get_qparams(model).points[k].scale, good.points[k].scale * 2)


def test_capture_inputs_sees_every_activation_once_per_forward(arch):
    model = _quantized(arch)
    seen = []
    with capture_inputs(model, lambda key, x: seen.append((key, tuple(x.shape), x.requires_grad))):
        _logits(model, _ids(batch=3, length=5))
    act_keys = [k for k in quant_points(model) if k.endswith(":input")]
    assert sorted(k for k, _, _ in seen) == sorted(act_keys) and len(seen) == 15
    for key, shape, _ in seen:
        m = model.get_submodule(key.rpartition(":")[0])
        assert shape == (3, 5, m.in_features), key
    seen.clear()
    _logits(model, _ids())
    assert seen == []                                      # detached when the block ends
    some = act_keys[:2]
    with capture_inputs(model, lambda key, x: seen.append(key), keys=some):
        _logits(model, _ids())
    assert seen == some
    with pytest.raises(ValueError, match="not activation points"):
        with capture_inputs(model, print, keys=["lm_head:weight"]):
            pass


def test_capture_sees_float_input_before_fake_quant():
    model = _quantized("llama")
    got = {}
    key = "model.layers.0.mlp.down_proj:input"
    ql = model.model.layers[0].mlp.down_proj
    hook = ql.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0]))
    with capture_inputs(model, lambda k, x: got.__setitem__(k, x), keys=[key]):
        _logits(model, _ids())
    hook.remove()
    assert torch.equal(got[key], got["x"])


def test_learn_mode_trains_ranges_and_commits_them(arch):
    model = _quantized(arch)
    ids = _ids()
    set_mode(model, "learn", "activations")
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.endswith(("log_s", "beta")))
    params = list(learned_parameters(model))
    assert len(params) == 2 * 15                          # u8 activations: log_s and beta
    with torch.no_grad():                                 # learn forward == quant forward at start
        start = model(ids).logits
    set_mode(model, "quant")
    assert torch.equal(_logits(model, ids), start)
    set_mode(model, "learn", "activations")
    opt = torch.optim.Adam(list(learned_parameters(model)), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None for p in learned_parameters(model))
        opt.step()
    points = quant_points(model)
    expect = {k: to_qparams(q.log_s, q.beta, q.spec) for k, q in points.items() if q.mode == "learn"}
    qp = get_qparams(model)
    for k, (s, z) in expect.items():
        assert np.array_equal(qp.points[k].scale, s) and np.array_equal(qp.points[k].zero_point, z)
    with torch.no_grad():
        learned_logits = model(ids).logits
    set_mode(model, "quant")                              # commit: integer z from here on
    assert not list(learned_parameters(model))
    committed = _logits(model, ids)
    other = _quantized(arch, calibrate=False)
    set_qparams(other, qp)
    assert torch.equal(_logits(other, ids), committed)
    torch.testing.assert_close(committed, learned_logits, rtol=0.05, atol=0.05)


def test_quant_mode_passes_gradients_straight_through():
    model = _quantized("llama")
    set_mode(model, "learn", "weights")                   # weight ranges learn, activations quant
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learned_parameters(model))
    assert sum(1 for _ in learned_parameters(model)) == 15   # symmetric: log_s only


def test_smoothing_hook(arch):
    model = _quantized(arch)
    ids = _ids()
    set_mode(model, "float", "all")
    ref = _logits(model, ids)
    ql = model.model.layers[0].mlp.down_proj
    factors = np.linspace(0.5, 2.0, ql.in_features).astype(np.float32)
    ql.set_smooth(factors)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    set_mode(model, "quant")
    qp = get_qparams(model)
    assert np.array_equal(qp.smoothing["model.layers.0.mlp.down_proj"], factors)
    other = _quantized(arch, calibrate=False)
    set_qparams(other, qp)
    assert torch.equal(_logits(other, ids), _logits(model, ids))


def test_refusals():
    with pytest.raises(NotImplementedError, match="attention_matmuls"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), QuantConfig(attention_matmuls=True))
    model = tiny_llama()
    with pytest.raises(ValueError, match="per tensor"):
        quantize_(model, QuantConfig(overrides={"lm_head:input": weight_spec(8)}))
    quantize_(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model)
    with pytest.raises(ValueError, match="mode is"):
        set_mode(model, "int8")
    q = quant_points(model)["lm_head:input"]
    for s, z in [(0.1, 300), (0.1, -1), (0.1, 3.5), (0.0, 3), (np.ones(2), np.zeros(2))]:
        with pytest.raises(ValueError, match="lm_head:input"):
            q.set_qparams(s, z)
    assert not q.calibrated and q.mode == "float"
    assert isinstance(next(iter(quant_points(model).values())), FakeQuantizer)


def test_attention_matmuls(arch):
    model = BUILDERS[arch]()
    ids = _ids()
    model.set_attn_implementation("eager")
    ref_eager = _logits(model, ids)
    model.set_attn_implementation("sdpa")
    config = QuantConfig(attention_matmuls=True)
    keys = quantize_(model, config)
    assert len(keys) == 30 + 2 * 2 * 2                    # 2 layers x (QK^T, PV) x 2 operands
    assert keys[-4:] == [f"model.layers.1.self_attn.{op}:{x}" for op in ("qk_matmul", "av_matmul")
                         for x in ("input", "other")]
    assert model.config._attn_implementation == "fedquant_eager"
    set_mode(model, "float")
    assert torch.equal(_logits(model, ids), ref_eager)   # HF's eager math, exactly

    _calibrate(model, _ids(1))
    qk = model.model.layers[0].self_attn.qk_matmul
    assert float(qk.input_quantizer.scale) > 0 and qk.input_quantizer.mode == "quant"
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a, out)))
             for n, m in model.named_modules() if isinstance(m, QuantMatMul)]
    ref = _logits(model, ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    for name, ((a, b), out) in seen.items():
        m = model.get_submodule(name)
        qa, qb = m.input_quantizer, m.other_quantizer
        fa = fake_quant(a, qa.scale.numpy(), qa.zero_point.numpy(), qa.spec)
        fb = fake_quant(b, qb.scale.numpy(), qb.zero_point.numpy(), qb.spec)
        assert not torch.equal(fa, a)
        assert torch.equal(out, torch.matmul(fa, fb)), name
    probs = seen["model.layers.0.self_attn.av_matmul"][0][0]
    assert probs.min() >= 0 and probs.max() <= 1

    counted = []
    with capture_inputs(model, lambda k, x: counted.append(k)):
        _logits(model, ids)
    assert sorted(counted) == sorted(k for k in keys if not k.endswith(":weight"))

    qp = get_qparams(model)
    other = BUILDERS[arch]()
    quantize_(other, config)
    set_qparams(other, qp)
    assert torch.equal(_logits(other, ids), ref)
    plain = _quantized(arch, calibrate=False)
    with pytest.raises(ValueError, match="qk_matmul:input: not a quantization point"):
        set_qparams(plain, qp)

    with torch.no_grad():                                 # KV-cache generation runs through it
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)

    set_mode(model, "learn", "activations")
    model(ids, labels=ids).loss.backward()
    assert qk.input_quantizer.log_s.grad is not None and qk.other_quantizer.beta.grad is not None


def test_attention_matmul_skip_and_override():
    a16 = activation_spec(16)
    model = tiny_llama()
    keys = quantize_(model, QuantConfig(attention_matmuls=True, skip=["*.layers.0.*.qk_matmul"],
                                        overrides={"*.av_matmul:input": a16}))
    assert "model.layers.0.self_attn.qk_matmul:input" not in keys and len(keys) == 36
    assert quant_points(model)["model.layers.1.self_attn.av_matmul:input"].spec == a16
    set_mode(model, "float")
    _logits(model, _ids())


def test_weight_cache_follows_weight_and_qparams():
    model = _quantized("llama")
    ids = _ids()
    ql = model.model.layers[0].mlp.up_proj
    ref = _logits(model, ids)
    assert ql.quantized_weight().requires_grad             # grad mode, trainable weight: no cache
    with torch.no_grad():
        first = ql.quantized_weight()
        assert ql.quantized_weight() is first                  # reused
        ql.linear.weight.mul_(0.5)                             # in place: recomputed
        assert not torch.equal(ql.quantized_weight(), first)
        ql.linear.weight.mul_(2.0)
        ql.weight_quantizer.scale.mul_(2)                      # qparams in place: recomputed
        doubled = ql.quantized_weight()
        ql.weight_quantizer.scale.div_(2)
        assert not torch.equal(doubled, first) and torch.equal(ql.quantized_weight(), first)
        ql.set_smooth(np.full(ql.in_features, 2.0, np.float32))   # smoothing: recomputed
        assert not torch.equal(ql.quantized_weight(), first)
        ql.set_smooth(None)
    assert torch.equal(_logits(model, ids), ref)
    QuantLinear.cache_weight = False
    try:
        assert torch.equal(_logits(model, ids), ref)
    finally:
        QuantLinear.cache_weight = True

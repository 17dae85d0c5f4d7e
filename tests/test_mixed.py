"""Mixed precision 4/8/16 (quant/mixed.py)."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from quant.instrument import QuantConfig, get_qparams, quant_points, quantize_, set_mode
from quant.mixed import MixedBudget, average_weight_bits, plan_mixed_precision, sensitivity
from quant.spec import activation_spec, weight_spec

torch.set_num_threads(1)

W4, W8 = weight_spec(4, group_size=64), weight_spec(8)
A8, A16 = activation_spec(8), activation_spec(16)


def test_equal_sizes_budget_met_exactly_by_the_most_sensitive():
    wsens = {f"l{i}:weight": float(s) for i, s in enumerate([5, 1, 9, 3, 7, 2, 8, 0, 6, 4])}
    numels = {k: 4096 for k in wsens}
    plan = plan_mixed_precision(wsens, {}, numels, MixedBudget(avg_weight_bits=6))
    assert average_weight_bits(plan, numels) == 6.0
    assert {k for k, s in plan.items() if s == W8} == {"l2:weight", "l6:weight", "l4:weight",
                                                       "l8:weight", "l0:weight"}
    assert all(s in (W4, W8) for s in plan.values())


def test_sensitivity_per_bit_and_budget_never_exceeded():
    # big layer: most sensitive in total, least per element; two small ones fit, the big one not
    wsens = {"big:weight": 10.0, "a:weight": 4.0, "b:weight": 3.0, "c:weight": 0.1}
    numels = {"big:weight": 8000, "a:weight": 1000, "b:weight": 1000, "c:weight": 1000}
    plan = plan_mixed_precision(wsens, {}, numels, MixedBudget(avg_weight_bits=5.0))
    assert plan["a:weight"] == plan["b:weight"] == W8
    assert plan["big:weight"] == plan["c:weight"] == W4
    assert average_weight_bits(plan, numels) <= 5.0
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 30))
        keys = [f"m{i}:weight" for i in range(n)]
        numels = {k: int(rng.integers(1, 10_000)) for k in keys}
        sens = {k: float(rng.exponential()) for k in keys}
        budget = float(rng.uniform(4, 8))
        plan = plan_mixed_precision(sens, {}, numels, MixedBudget(avg_weight_bits=budget))
        assert average_weight_bits(plan, numels) <= budget
    all8 = plan_mixed_precision(sens, {}, numels, MixedBudget(avg_weight_bits=8))
    assert all(s == W8 for s in all8.values())
    all4 = plan_mixed_precision(sens, {}, numels, MixedBudget(avg_weight_bits=4))
    assert all(s == W4 for s in all4.values())


def test_activation_share_goes_to_the_most_sensitive():
    asens = {f"l{i}:input": float(i) for i in range(20)}     # l0 has sensitivity 0
    plan = plan_mixed_precision({}, asens, {}, MixedBudget(max_act16_share=0.1))
    assert {k for k, s in plan.items() if s == A16} == {"l19:input", "l18:input"}
    assert sum(s == A8 for s in plan.values()) == 18
    none = plan_mixed_precision({}, {"a:input": 0.0, "b:input": -1.0}, {},
                                MixedBudget(max_act16_share=1.0))
    assert all(s == A8 for s in none.values())            # promoting cannot help these


def test_plan_is_usable_as_overrides_and_budget_validates():
    plan = plan_mixed_precision({"model.layers.0.mlp.down_proj:weight": 1.0},
                                {"model.layers.0.mlp.down_proj:input": 1.0},
                                {"model.layers.0.mlp.down_proj:weight": 8192},
                                MixedBudget(avg_weight_bits=4, max_act16_share=1.0))
    config = QuantConfig(overrides=plan)
    assert config.spec_for("model.layers.0.mlp.down_proj:input") == A16
    assert config.spec_for("model.layers.0.mlp.down_proj:weight") == W4
    with pytest.raises(ValidationError):
        MixedBudget(avg_weight_bits=3)
    with pytest.raises(ValidationError):
        MixedBudget(max_act16_share=1.5)
    with pytest.raises(ValueError, match="no numel"):
        plan_mixed_precision({"x:weight": 1.0}, {}, {}, MixedBudget())


def test_sensitivity_on_the_tiny_model():
    from simulation.models import tiny_llama

    model = tiny_llama()
    batches = [torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    with torch.no_grad():
        float_logits = [model(b).logits for b in batches]
    quantize_(model, QuantConfig())

    def loss_fn(m, b):   # distillation against the float model: 0 in float, > 0 once quantized
        i = next(j for j, x in enumerate(batches) if x is b)
        return float(((m(b).logits - float_logits[i]) ** 2).mean())

    keys = ["model.layers.0.mlp.down_proj:weight", "lm_head:weight",
            "model.layers.0.self_attn.q_proj:input", "model.layers.1.mlp.down_proj:input"]
    before = get_qparams(model)
    modes = {k: q.mode for k, q in quant_points(model).items()}
    def low4(key):
        return weight_spec(4, group_size=32) if key.endswith(":weight") else activation_spec(4)

    s4 = sensitivity(model, batches, loss_fn, keys, low4)
    s8 = sensitivity(model, batches, loss_fn, keys,
                     {k: (weight_spec(8) if k.endswith(":weight") else A8) for k in keys})
    assert set(s4) == set(keys)
    assert all(s4[k] > s8[k] > 0 for k in keys), (s4, s8)
    after = get_qparams(model)                            # quantizers restored
    assert {k: q.mode for k, q in quant_points(model).items()} == modes
    for k, p in before.points.items():
        assert after.points[k].spec == p.spec and np.array_equal(after.points[k].scale, p.scale)
    set_mode(model, "float")
    with torch.no_grad():
        assert loss_fn(model, batches[0]) == 0.0
    with pytest.raises(ValueError, match="not quantization points"):
        sensitivity(model, batches, loss_fn, ["nope:input"], low4)



def test_fit_term_sums_in_chunks_as_in_one_piece():
    """The plan job's FIT term is summed a chunk at a time (no float64 copy of a whole lm_head):
    the same sum, in float64, as the product of the whole tensors; shapes must match."""
    import torch

    from quant.mixed import fit_term

    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.standard_normal((37, 53)).astype(np.float32))
    d = torch.from_numpy((rng.standard_normal((37, 53)) * 1e-3).astype(np.float32))
    whole = float(((g.double() * d.double()) ** 2).sum())
    for chunk in (1, 7, 100, 37 * 53, 1 << 20):
        assert fit_term(g, d, chunk=chunk) == pytest.approx(whole, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        fit_term(g, d[:, :5])

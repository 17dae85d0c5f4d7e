"""Where the hand-written mixed 4/8/16 plan came from (issue 5; configs/quality/handplan.toml, the
default's until issue 19): what its 4-bit weights cost, and which down_proj inputs get int16.

    .venv/bin/python -m bench.mixed_plan   # writes bench/results/mixed_plan.json; 42 min beside the
                                           # benchmark's simulations (its wall_s in the JSON)

On SmolLM2 in torch, two measurements, both on the pooled training text of every client (the
design decision of the engineer who ships the profile, made once per model; the held-out roles are
only reported, never used to choose):

1. **Weights only** (activations float): perplexity of the weight recipes the profile could use --
   4-bit symmetric min-max in groups of 64 with the down_proj weights at 8 bits (the profile before),
   the lm_head (SmolLM2's tied 49152 x 576 embedding) at 8 bits too, asymmetric uint4 groups, and
   SmoothQuant at the profile's strength folded in first. This is the floor the activation ranges
   cannot lower.
2. **Which inputs get int16**: each down_proj input alone at uint8 (min-max of ``x / m`` over the
   text, the rest of the model float): its loss increase. ``quant.mixed.plan_mixed_precision`` then
   lifts the most sensitive ones to int16 within the budget (10% of the profile's activation points;
   the other points were not probed and count as 0, so they stay at 8 bits).

The plan is compared with the overrides of the config's mixed fleet entry: by default
configs/quality/handplan.toml, the hand-written plan this bench made (configs/default.toml now lets
the fleet choose: ``server.plans``, a plan round, client/plan.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, write_json


def perplexity(model, ids: np.ndarray, batch: int = 8) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            b = torch.as_tensor(ids[i:i + batch], dtype=torch.long)
            logits = model(b).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           b[:, 1:].reshape(-1), reduction="sum"))
            n += b[:, 1:].numel()
    return float(np.exp(nll / n))


def channel_absmax(model, ids: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Per-input-channel abs-max of every Linear's input: what the fleet's scouting merges by max."""
    import torch

    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def see(mod, inp):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            out[name] = torch.maximum(out[name], a) if name in out else a
        return see

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model(torch.as_tensor(ids[i:i + batch], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return {k: v.numpy() for k, v in out.items()}


def weight_spec_for(path: str, qcfg, lm_head_8bit: bool, symmetric: bool):
    from quant.spec import weight_spec

    if path.endswith("down_proj") or (lm_head_8bit and path == "lm_head"):
        return weight_spec(8)
    return weight_spec(4, group_size=qcfg.weight.group_size, symmetric=symmetric)


def weights_only(model, absmax, qcfg, alpha: float | None, lm_head_8bit: bool, symmetric: bool):
    """A copy of ``model`` whose Linear weights are fake-quantized (min-max at each spec), smoothed
    by ``alpha`` first when given; activations stay float, so ``W*m`` quantized is divided back."""
    import copy

    import torch

    from quant.affine import fake_quant, range_to_qparams, tensor_range
    from quant.smoothing import smoothing_factors

    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach().float().numpy()
        f = np.ones(w.shape[1], np.float32) if alpha is None else smoothing_factors(absmax[name], w, alpha)
        spec = weight_spec_for(name, qcfg, lm_head_8bit, symmetric)
        ws = w * f
        s, z = range_to_qparams(*tensor_range(ws, spec), spec)
        q = fake_quant(ws, s, z, spec) / f
        mod.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)))
    return m


def down_proj_sensitivity(model, absmax, alpha: float, ids: np.ndarray, probe: np.ndarray) -> dict:
    """Loss increase of each down_proj input alone at uint8 (min-max of x / m over ``ids``), the
    rest of the model float, on ``probe``."""
    import torch

    from quant.affine import fake_quant, range_to_qparams
    from quant.smoothing import smoothing_factors
    from quant.spec import activation_spec

    spec = activation_spec(8)
    downs = [n for n, _ in model.named_modules() if n.endswith("mlp.down_proj")]
    f = {d: torch.from_numpy(smoothing_factors(absmax[d], model.get_submodule(d).weight.detach().numpy(), alpha))
         for d in downs}
    lo = {d: 0.0 for d in downs}
    hi = {d: 0.0 for d in downs}

    def ranges(d):
        def see(mod, inp):
            x = inp[0] / f[d]
            lo[d], hi[d] = min(lo[d], float(x.min())), max(hi[d], float(x.max()))
        return see

    handles = [model.get_submodule(d).register_forward_pre_hook(ranges(d)) for d in downs]
    try:
        perplexity(model, ids)
    finally:
        for h in handles:
            h.remove()
    base = np.log(perplexity(model, probe))
    result = {}
    for d in downs:
        s, z = range_to_qparams(lo[d], hi[d], spec)

        def quantized(mod, inp, d=d, s=s, z=z):
            x = inp[0] / f[d]
            return (fake_quant(x, torch.as_tensor(s), torch.as_tensor(z), spec) * f[d],)

        h = model.get_submodule(d).register_forward_pre_hook(quantized)
        try:
            result[f"{d}:input"] = {"dloss": float(np.log(perplexity(model, probe)) - base),
                                    "range": [lo[d], hi[d]]}
        finally:
            h.remove()
        print(f"{d}: x/m in [{lo[d]:.1f}, {hi[d]:.1f}], loss +{result[f'{d}:input']['dloss']:.5f}", flush=True)
    return result


def main(argv=None) -> dict:
    import torch

    from quant.mixed import MixedBudget, average_weight_bits, plan_mixed_precision
    from simulation.config import quant_config_for
    from simulation.fleet import build_fleet
    from simulation.models import load_model
    from simulation.prepare import load_simulation_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quality" / "handplan.toml")
    ap.add_argument("--profile", default="mixed")
    ap.add_argument("--json", type=Path, default=RESULTS / "mixed_plan.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg = load_simulation_config(args.config)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model)
    model.eval()
    entries = {e.load().name: e for e in cfg.fleet}
    entry = entries[args.profile]
    qcfg = quant_config_for(entry.load(), entry)
    alpha = cfg.server.smoothing.alpha_for(args.profile) if cfg.server.smoothing else None
    clients, evals, _ = build_fleet(cfg.data, tokenizer, [(n, e.share) for n, e in entries.items()])
    train = np.concatenate([c.train for c in clients]).astype(np.int64)
    tests = np.concatenate([c.test for c in clients if len(c.test)]).astype(np.int64)
    evals = np.asarray(evals, np.int64)
    absmax = channel_absmax(model, train)

    shown = args.config.resolve()
    res: dict = {"config": str(shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown), "profile": args.profile, "alpha": alpha,
                 "data": {"train_sequences": len(train), "clients_test_sequences": len(tests),
                          "heldout_sequences": len(evals), "seq_len": cfg.data.seq_len},
                 "float": {"clients_test": perplexity(model, tests), "heldout": perplexity(model, evals)}}
    print("float", res["float"], flush=True)
    rows = []
    for label, a, lm8, sym in (("W4 sym g64, down_proj W8", None, False, True),
                               ("+ lm_head W8", None, True, True),
                               ("+ asymmetric uint4 groups", None, True, False),
                               (f"+ SmoothQuant alpha {alpha}", alpha, True, False)):
        m = weights_only(model, absmax, qcfg, a, lm8, sym)
        row = {"recipe": label, "clients_test": perplexity(m, tests), "heldout": perplexity(m, evals)}
        for k in ("clients_test", "heldout"):
            row[f"{k}_increase_pct"] = round(100 * (row[k] / res["float"][k] - 1), 2)
        rows.append(row)
        print(row, flush=True)
    res["weights_only"] = rows

    sens = down_proj_sensitivity(model, absmax, alpha or 0.0, train, train[::3])
    res["down_proj_inputs"] = sens
    points = [k for k in qcfg_keys(model, qcfg) if not k.endswith(":weight")]
    act_sens = {k: sens[k]["dloss"] if k in sens else 0.0 for k in points}
    plan = plan_mixed_precision({}, act_sens, {}, MixedBudget(max_act16_share=0.1))
    lifted = sorted((k for k, s in plan.items() if s.bits == 16), key=lambda k: int(k.split(".")[2]))
    configured = sorted((k for k, s in qcfg.overrides.items() if not k.endswith(":weight") and s.bits == 16),
                        key=lambda k: int(k.split(".")[2]))
    numels = {f"{n}:weight": m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wplan = {k: weight_spec_for(k.rpartition(":")[0], qcfg, True, False) for k in numels}
    res["plan"] = {"activation_points": len(points), "int16": lifted, "matches_config": lifted == configured,
                   "avg_weight_bits": round(average_weight_bits(wplan, numels), 3)}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"int16 plan ({len(lifted)} of {len(points)}): {lifted}\nconfig: {configured}\n"
          f"matches the config: {lifted == configured}; average weight bits {res['plan']['avg_weight_bits']}")
    write_json(args.json, res)
    return res


def qcfg_keys(model, qcfg) -> list[str]:
    """The profile's quantization point keys (quant.instrument on a copy of the model)."""
    import copy

    from quant.instrument import quantize_

    return quantize_(copy.deepcopy(model), qcfg)


if __name__ == "__main__":
    main()

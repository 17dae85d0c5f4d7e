"""bench/mixed_plan.py on the tiny model: the int16 plan follows quant.mixed's rule on the probed
losses, within the budget, and is compared with the config's overrides."""

from __future__ import annotations

import json
from pathlib import Path

from bench import mixed_plan, readme_tables

ROOT = Path(__file__).resolve().parent.parent

CONFIG = '''
name = "tiny-mixed"
model = "tiny-llama"
threads = 1
[data]
clients = 4
seq_len = 32
train_sequences = 3
test_sequences = 1
eval_sequences = 4
random_sequences = 4
[[fleet]]
profile = "{profiles}/mixed.toml"
share = 1
[fleet.overrides]
"lm_head:weight" = {{ bits = 8, signed = true, symmetric = true, granularity = "per_channel", axis = 0 }}
"model.layers.1.mlp.down_proj:input" = {{ bits = 16, signed = true, symmetric = true }}
[server]
min_available = 4
smoothing = {{ alpha = 0.8, profiles = {{ mixed = 0.5 }} }}
[[server.schedule]]
job = "scout"
[[server.schedule]]
job = "stats"
'''


def test_mixed_plan_follows_the_rule_within_budget(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(profiles=ROOT / "configs" / "profiles"))
    out = tmp_path / "plan.json"
    res = mixed_plan.main(["--config", str(cfg), "--json", str(out)])
    assert json.loads(out.read_text())["plan"] == res["plan"]
    plan, sens = res["plan"], res["down_proj_inputs"]
    assert res["alpha"] == 0.5 and len(sens) == 2          # tiny-llama: two layers
    assert len(plan["int16"]) <= int(0.1 * plan["activation_points"])
    # The rule: the most sensitive (positive) inputs first.
    ranked = sorted((k for k in sens if sens[k]["dloss"] > 0), key=lambda k: -sens[k]["dloss"])
    assert plan["int16"] == sorted(ranked[:len(plan["int16"])])
    assert plan["matches_config"] == (plan["int16"] == ["model.layers.1.mlp.down_proj:input"])
    assert [r["recipe"] for r in res["weights_only"]][:2] == ["W4 sym g64, down_proj W8", "+ lm_head W8"]
    assert all(r["clients_test"] > 0 and r["heldout"] > 0 for r in res["weights_only"])
    assert 4.0 < plan["avg_weight_bits"] < 8.0
    block = readme_tables.mixed_plan_block(res)
    assert block.count("\n| ") == 2 + len(res["weights_only"])     # separator, float, one per recipe
    assert f"({len(plan['int16'])} of {plan['activation_points']} activation points)" in block

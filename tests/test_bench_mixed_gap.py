"""bench/mixed_gap.py on a tiny-model run with a planned mixed profile: every row is another model
evaluated on the same float reference, the stand-ins do what they say, the run is left alone."""

import json
from pathlib import Path

import numpy as np

from bench import mixed_gap

ROOT = Path(__file__).resolve().parents[1]


def test_the_mixed_profile_taken_apart(tmp_path):
    from test_simulate import simulate

    run = tmp_path / "plan-smoke"
    simulate(run, config=ROOT / "configs" / "plan-smoke.toml")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    res = mixed_gap.main(["--run", str(run), "--json", str(tmp_path / "g.json"), "--work", str(tmp_path / "w"),
                          "--threads", "1"])
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(json.dumps(res))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    rows = {r["name"]: r for r in res["rows"]}
    final = rows["none: the run's final QParams"]
    summary = json.loads((run / "summary.json").read_text())["profiles"]["mixed"]
    # the first row is the server's own last evaluation of the final QParams
    assert final["heldout"]["perplexity"] == summary["federated_eval"][-1]["perplexity"]
    assert res["plan"]["weights8"] > 0 and res["plan"]["act16"] > 0
    floats = {r["heldout"]["float_perplexity"] for r in res["rows"]}
    assert len(floats) == 1                                      # one float reference for every row
    w16 = rows["every weight 16-bit per channel (the activations' error alone)"]
    assert w16["heldout"]["perplexity"] != final["heldout"]["perplexity"]      # another model
    assert w16["heldout"]["kl"] < final["heldout"]["kl"]        # 4-bit weights cost more than 16-bit ones
    assert any(r.get("kind") == "lm_head" for r in res["rows"])
    for r in res["rows"]:
        for t in ("clients_test", "heldout", "ood"):
            assert r[t]["kl"] >= 0 and np.isfinite(r[t]["vs_float_pct"])
    assert "4-bit weight ranges by min-max" not in "".join(rows)      # the run has no importance
    assert set(res["clipped_share"]) == {"clients_test", "heldout", "ood"}
    assert "| every weight 8-bit per channel |" in mixed_gap.markdown_table(res)

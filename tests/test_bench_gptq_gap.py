"""bench/gptq_gap.py on a tiny-model run with a planned mixed profile: GPTQ's codes reach the
runtime through its own re-quantization, the rows share one float reference, the run is left alone."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import gptq_gap

ROOT = Path(__file__).resolve().parents[1]


def test_gptq_rows_on_a_finished_run(tmp_path):
    from test_simulate import simulate

    run = tmp_path / "plan-smoke"
    simulate(run, config=ROOT / "configs" / "plan-smoke.toml")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    res = gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "g.json"), "--work", str(tmp_path / "w"),
                         "--threads", "1", "--damp", "0.01", "0.1"])
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(json.dumps(res))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    first, *gptq = res["rows"]
    summary = json.loads((run / "summary.json").read_text())["profiles"]["mixed"]
    assert first["heldout"]["perplexity"] == summary["federated_eval"][-1]["perplexity"]
    assert [r["damp"] for r in gptq] == [0.01, 0.1] and res["linears"] > 0
    [moments] = res["second_moments"]
    assert moments["tokens"] > 0 and res["weights"] >= 16 * res["linears"]
    for r in gptq:      # another model each, on the same float reference
        assert r["heldout"]["perplexity"] != first["heldout"]["perplexity"]
        assert r["heldout"]["float_perplexity"] == first["heldout"]["float_perplexity"]
        for t in ("clients_test", "heldout", "ood"):
            assert r[t]["kl"] >= 0 and np.isfinite(r[t]["vs_float_pct"])
    assert gptq[0]["heldout"]["perplexity"] != gptq[1]["heldout"]["perplexity"]
    assert "| GPTQ, every client's train text, damp 0.1 |" in gptq_gap.markdown_table(res)
    two = gptq_gap.seeds_table([res, {**res, "seed": 7}])
    assert two.count("| 7 | GPTQ, every client's train text, damp 0.01 |") == 1 and two.count("\n") == 2 + 2 * 3
    # moments of fewer clients' text: a row per count, the text growing, the first client's a model of its own
    few = gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "few.json"), "--work", str(tmp_path / "w"),
                         "--threads", "1", "--clients", "2", "1"])
    one, two_clients = few["rows"][1:]
    assert [r["clients"] for r in few["rows"][1:]] == [1, 2] and 0 < one["tokens"] < two_clients["tokens"]
    assert [m["clients"] for m in few["second_moments"]] == [1, 2]
    assert one["heldout"]["perplexity"] != two_clients["heldout"]["perplexity"]
    assert f"clients' train text ({one['tokens']} tokens), damp 0.01 |" in gptq_gap.markdown_table(few)
    with pytest.raises(SystemExit, match="--clients: between 1 and"):
        gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "bad.json"), "--work", str(tmp_path / "w"),
                       "--clients", "0"])

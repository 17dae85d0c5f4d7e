"""bench/evaluate_run.py on a tiny-model run directory: every profile's QParams on the held-out
roles and the out-of-domain text, exact and cached-reference fidelity, and the run left untouched."""

import json

import pytest

from bench import evaluate_run


def test_evaluates_every_profile_on_both_texts_and_leaves_the_run_alone(smoke_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    res = evaluate_run.main(["--run", str(smoke_run), "--eval-sequences", "12", "--ood-sequences", "10",
                             "--threads", "1", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(res))
    assert {p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()} == set(before.values())
    assert res["heldout"]["sequences"] == 12 and res["heldout"]["documents"] == 12
    assert res["ood"]["sequences"] == 10 and res["ood"]["documents"] == 10
    assert {(r["profile"], r["qparams"]) for r in res["rows"]} == {
        (p, q) for p in ("int8", "int16") for q in ("random-token calibration (start)",
                                                    "centralized, same recipe on pooled data", "fedquant, final")}
    summary = json.loads((smoke_run / "summary.json").read_text())
    for r in res["rows"]:
        for text in ("heldout", "ood"):
            e = r[text]
            assert e["float_perplexity"] == pytest.approx(res["float_perplexity"][text], rel=1e-9)
            assert e["kl"] > 0 and 0 < e["top1"] <= 1 and e["kl_ci"][0] <= e["kl_ci"][1]
            # beside the exact KL, the cached top-k one: a lower bound, with the same top-1 and perplexity
            t = e["top_k_reference"]
            assert t["kl"] <= e["kl"] * (1 + 1e-4) and t["top1"] == e["top1"]
            assert t["vs_float_pct"] == pytest.approx(e["vs_float_pct"], abs=1e-9)
        if r["qparams"] == "fedquant, final":        # 12 sequences here, 8 in the run: close, not equal
            assert r["server_eval_seconds"] >= 0      # timed (the tiny model: well under 0.1 s)
            assert r["heldout"]["perplexity"] == pytest.approx(summary["profiles"][r["profile"]]["federated_ppl"][-1],
                                                               rel=0.05)
    assert "| int8 | fedquant, final |" in evaluate_run.markdown_table(res)


def test_a_directory_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no run.json"):
        evaluate_run.main(["--run", str(tmp_path), "--out", str(tmp_path / "e.json")])

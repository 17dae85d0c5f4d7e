"""bench/gptq_gap.py on a tiny-model run with a planned mixed profile: the clients' hessian job, the
server's GPTQ and the device running the QParams' codes; the rows share one float reference, the run
is left alone."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import gptq_gap

ROOT = Path(__file__).resolve().parents[1]


def test_the_bench_patch_keeps_every_field_of_the_qparams():
    """``bench.ood_gap.patch`` only raises the version: GPTQ's codes and the importance reach the device."""
    from bench.ood_gap import patch
    from quant.qparams import PointParams, QParams
    from quant.spec import weight_spec

    spec = weight_spec(4)
    qp = QParams({"l:weight": PointParams(spec, np.ones(2, np.float32), np.zeros(2, spec.numpy_dtype))}, "m", 3,
                 {"l": np.full(3, 2.0, np.float32)}, {"k": "v"}, {"l": np.ones(3, np.float32)},
                 {"l:weight": np.zeros((2, 3), spec.numpy_dtype)})

    class Runtime:
        qparams = QParams({}, "m", 7)

        def patch(self, new):
            self.got = new

    rt = Runtime()
    patch(rt, qp)
    assert rt.got.version == 8 and qp.version == 3
    for f in ("points", "model", "smoothing", "meta", "importance", "codes"):
        assert getattr(rt.got, f) is getattr(qp, f), f


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
    assert first["codes"] == 0 and "rounded" not in first      # the run rounds to the nearest
    assert [r["damp"] for r in gptq] == [0.01, 0.1] and res["linears"] > 0
    [moments] = res["second_moments"]
    assert moments["tokens"] > 0 and res["weights"] >= 16 * res["linears"]
    for r in gptq:      # another model each, on the same float reference
        # every 4-bit Linear rounded by GPTQ, and the device ran each from the QParams' codes
        assert r["rounded"] == r["codes"] == res["linears"] and r["failed"] == 0 and "failures" not in r
        assert r["tokens"] == moments["tokens"] and r["gptq_s"] >= 0
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
    assert [m["tokens"] for m in few["second_moments"]] == [one["tokens"], two_clients["tokens"]]
    assert all(r["rounded"] == r["codes"] == few["linears"] for r in (one, two_clients))
    assert one["heldout"]["perplexity"] != two_clients["heldout"]["perplexity"]
    assert few["rows"][0]["heldout"] == first["heldout"]       # the same baseline, the float logits reused
    assert f"clients' train text ({one['tokens']} tokens), damp 0.01 |" in gptq_gap.markdown_table(few)
    with pytest.raises(SystemExit, match="--clients: between 1 and"):
        gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "bad.json"), "--work", str(tmp_path / "w"),
                       "--clients", "0"])
    # moments of another domain's text (the Factbook's countries the evaluation does not draw from),
    # alone and beside the clients': as many sequences as the clients hold
    from bench.common import finished_run

    texts = finished_run(run)
    other = gptq_gap.factbook_text(texts, 5)
    assert other.shape == (5, texts.cfg.data.seq_len)
    assert not any((other == row).all(axis=1).any() for row in texts.ood)        # none of the evaluated windows
    fb = gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "fb.json"), "--work", str(tmp_path / "w"),
                        "--threads", "1", "--moments", "factbook"])
    both = gptq_gap.main(["--run", str(run), "--json", str(tmp_path / "both.json"), "--work", str(tmp_path / "w"),
                          "--threads", "1", "--moments", "both"])
    assert fb["second_moments"][0]["tokens"] == moments["tokens"]        # as many sequences as the clients'
    assert both["second_moments"][0]["tokens"] == 2 * moments["tokens"]
    assert fb["rows"][1]["name"].startswith("GPTQ, Factbook text of countries not evaluated")
    assert fb["rows"][1]["rounded"] == res["linears"]
    assert fb["rows"][1]["ood"]["kl"] != gptq[0]["ood"]["kl"] != both["rows"][1]["ood"]["kl"]
    with pytest.raises(SystemExit):
        gptq_gap.main(["--run", str(run), "--moments", "both", "--clients", "1"])

"""bench/ood_gap.py --quick on the tiny random-init model: every variant evaluated on the clients'
text, the held-out roles and the out-of-domain text, the clipping measured, a choice made from the
clients' text only."""

import json

import numpy as np
import pytest

from bench import ood_gap

TEXTS = ("clients_test", "heldout", "ood")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("oodgap")
    res = ood_gap.main(["--quick", "--out", str(out / "run"), "--json", str(out / "ood_gap.json")])
    assert json.loads((out / "ood_gap.json").read_text()) == json.loads(json.dumps(res))
    return res


def test_every_variant_on_every_text_against_one_float_reference(result):
    names = [r["name"] for r in result["rows"]]
    assert len(names) == len(set(names))
    kinds = {r["kind"] for r in result["rows"] if "kind" in r}
    assert kinds == {"qkv", "o_proj", "gate_up", "down_proj", "lm_head"}      # the tiny Llama's Linears
    assert {r["group"] for r in result["rows"]} == {"decomposition", "weights", "remedy"}
    lifted = [r for r in result["rows"] if r["group"] == "weights"]     # one kind's weights at 16 bits each
    assert sorted(r["kind"] for r in lifted) == sorted({r["kind"] for r in lifted}) and len(lifted) >= 4
    assert sum(r["weights"] for r in lifted) == 2 * 7 + 1               # every Linear of the tiny Llama's 2 layers
    for r in result["rows"]:
        for t in TEXTS:
            e = r[t]
            assert e["float_perplexity"] == pytest.approx(result["float_perplexity"][t], rel=1e-12)
            assert e["kl"] >= 0 and 0 < e["top1"] <= 1 and e["kl_ci"][0] <= e["kl_ci"][1]
            assert np.isfinite(e["perplexity"])


def test_the_rebuilt_graphs_leave_the_reference_unchanged(result):
    """The decomposition rebuilds the graph for int16 points (as a plan does); going back to the
    reference recipe must give the reference's figures again."""
    first, again = (r for r in result["rows"] if r["name"] in ("A8W8: the reference recipe", "reference"))
    for t in TEXTS:
        assert again[t]["perplexity"] == pytest.approx(first[t]["perplexity"], rel=1e-9)
        assert again[t]["kl"] == pytest.approx(first[t]["kl"], rel=1e-6, abs=1e-12)


def test_the_int16_stand_ins_are_closer_to_float(result):
    rows = {r["name"]: r for r in result["rows"]}
    ref = rows["A8W8: the reference recipe"]
    control = next(r for n, r in rows.items() if n.startswith("control: all int16"))
    for t in TEXTS:
        assert control[t]["kl"] < ref[t]["kl"]


def test_clipping_is_a_share_per_text_and_kind(result):
    by = result["clipping"]["by_kind"]
    assert set(by) == {"train", "heldout", "ood"}
    for per in by.values():
        for k in per.values():
            assert 0 <= k["clipped_mean"] <= k["clipped_max"] <= 1 and k["absmax_over_range_max"] > 0
    assert len(result["clipping"]["top_ood"]) == 10


def test_the_choice_reads_the_clients_text_only(result):
    chosen = result["chosen_on_clients_text"]["name"]
    candidates = [r for r in result["rows"] if r["group"] == "remedy"]
    assert chosen == min(candidates, key=lambda r: r["clients_test"]["kl"])["name"]


def test_a_per_token_config_and_its_unsmoothed_recipe(tmp_path):
    """``--config`` with per-token down_proj inputs (as the default): no row lifts them, the int16
    rows keep their 8-bit weights (MatMulInteger's), and ``--unsmoothed`` gives another recipe."""
    from pathlib import Path

    smoke = Path(ood_gap.__file__).resolve().parents[1] / "configs" / "smoke.toml"
    cfg = tmp_path / "pt.toml"
    cfg.write_text(smoke.read_text().replace('profile = "int8"\nshare = 2\n',
                                             'profile = "int8"\nshare = 2\nper_token = ["*.down_proj"]\n'))
    res = {}
    for name, extra in (("smoothed", []), ("unsmoothed", ["--unsmoothed", "*.down_proj"])):
        res[name] = ood_gap.main(["--config", str(cfg), "--only", "decomposition", *extra,
                                  "--out", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")])
        kinds = {r["kind"] for r in res[name]["rows"] if "kind" in r}
        assert "down_proj" not in kinds and "qkv" in kinds
        assert any(r["name"].startswith("control: all int16") for r in res[name]["rows"])
        assert "--config" in res[name]["command"]
    ref = {n: next(r for r in v["rows"] if r["name"] == "A8W8: the reference recipe") for n, v in res.items()}
    assert ref["smoothed"]["heldout"]["perplexity"] != ref["unsmoothed"]["heldout"]["perplexity"]

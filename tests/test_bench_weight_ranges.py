"""bench/weight_ranges.py on a tiny-model run directory, and quant/weight_ranges.py's search:
never worse than min-max on the error it minimises, min-max itself at ratio 1."""

import json

import numpy as np
import pytest

from bench import weight_ranges
from quant.affine import fake_quant, range_to_qparams, tensor_range
from quant.spec import QuantSpec, weight_spec
from quant.weight_ranges import weight_point, weighted_rounding_error


@pytest.mark.parametrize("spec", [weight_spec(8), weight_spec(4, 16, symmetric=False), weight_spec(4, 16),
                                  QuantSpec(bits=8)], ids=lambda s: s.short())
def test_weight_point_minimises_the_weighted_rounding_error(spec):
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(24, 64)).astype(np.float32)
    h = rng.gamma(0.5, size=64)
    h[5] = 50.0                                                   # a loud input channel
    s0, z0 = range_to_qparams(*tensor_range(w, spec), spec)
    mm = weight_point(w, spec, h, ratios=[1.0])
    assert np.array_equal(mm.scale, s0) and np.array_equal(mm.zero_point, z0)   # ratio 1 is min-max
    best = weight_point(w, spec, h)

    def err(p, weights):
        return float((weights * (w - fake_quant(w, p.scale, p.zero_point, spec)) ** 2).sum())
    assert err(best, h) <= err(mm, h)
    assert err(best, h) < err(mm, h) or spec.granularity == "per_tensor"   # one range: here min-max is best
    np.testing.assert_allclose(weighted_rounding_error(w, best.scale, best.zero_point, spec, h).sum(),
                               err(best, h), rtol=1e-5)
    # the column weights matter: the plain-MSE choice is worse on the weighted error, and vice versa
    plain = weight_point(w, spec)
    assert err(best, h) <= err(plain, h) and err(plain, np.ones(64)) <= err(best, np.ones(64))
    with pytest.raises(ValueError, match="importance must be 64"):
        weight_point(w, spec, h[:-1])
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\]"):
        weight_point(w, spec, h, ratios=[1.5])


def test_weight_ranges_rows_on_a_run(smoke_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    # the run's own text sizes (configs/smoke.toml): the min-max row is checked against its server
    res = weight_ranges.main(["--runs", str(smoke_run), "--eval-sequences", "8", "--ood-sequences", "8",
                              "--threads", "1", "--out", str(tmp_path / "w.json")])
    assert json.loads((tmp_path / "w.json").read_text()) == json.loads(json.dumps(res))
    assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()} == before
    (row,) = res["runs"]
    assert set(row["profiles"]) == {"int8", "int16"}
    for prof, r in row["profiles"].items():
        assert r["weight_points"] >= 14                                # tiny-llama: 2 layers x 7 + lm_head
        assert r["checked_against_server"]
        assert set(r["variants"]) == set(weight_ranges.VARIANTS)
        for v in r["variants"].values():
            for text in ("heldout", "ood"):
                assert v[text]["kl"] >= 0 and 0 < v[text]["top1"] <= 1
        # other weights, another model; the float reference the same
        assert r["variants"]["importance"]["heldout"]["perplexity"] != r["variants"]["min-max"]["heldout"]["perplexity"]
        assert r["variants"]["importance"]["heldout"]["float_perplexity"] == \
            r["variants"]["min-max"]["heldout"]["float_perplexity"]
    assert "weighted by the clients' E[x^2]" in weight_ranges.markdown_table(res)
    with pytest.raises(SystemExit, match="no run.json"):
        weight_ranges.main(["--runs", str(tmp_path), "--out", str(tmp_path / "x.json")])

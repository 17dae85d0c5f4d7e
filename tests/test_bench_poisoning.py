"""bench.poisoning on the tiny model (configs/smoke.toml): the attacks pass the server's
validation, the exact rules follow them, the robust rules bound them, the cache of honest replies
gives what the client computes, and the command writes and merges its JSON and table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import poisoning as bp

pytestmark = pytest.mark.bench      # about 40 s: the tiny model prepared, then a few scenarios

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from bench.common import quiet_env
    from simulation.prepare import load_simulation_config, prepare

    quiet_env()
    src = tmp_path_factory.mktemp("poison") / "prepared"
    prepare(load_simulation_config(SMOKE), src)
    return src


@pytest.fixture(scope="module")
def fleet(prepared, tmp_path_factory):
    cfg, fleet, seeded = bp.open_fleet(SMOKE, prepared, tmp_path_factory.mktemp("poison") / "bench")
    assert seeded == "seed_run_dir"
    return cfg, fleet


def _stage(config, jobs):
    return [(r, s) for r, s in config.rounds() if s.job in jobs]


def _clean(fleet, config):
    from server.state import initial_state

    s0 = initial_state(fleet.prep.initial, "t")
    s1, _ = bp.run_rounds(fleet, s0, _stage(config, ("scout",)), config)
    s3, _ = bp.run_rounds(fleet, s1, _stage(config, ("stats",)), config)
    return s0, s1, s3


def _attack(name):
    a = bp.ATTACKS[name]
    return {**a, "job": a["stage"]}


def test_attackers_are_spread_over_the_profiles_and_always_sampled():
    prof = {str(i): ("int8" if i % 3 else "mixed") for i in range(24)}
    assert [len(bp.pick_attackers(prof, k)) for k in (1, 3, 8)] == [1, 3, 8]
    assert [prof[c] for c in bp.pick_attackers(prof, 1)] == ["int8"]
    assert sorted(prof[c] for c in bp.pick_attackers(prof, 3)) == ["int8", "int8", "mixed"]
    who = bp.pick_attackers(prof, 8)
    assert sum(prof[c] == "mixed" for c in who) == 3
    sample = sorted(["1", "2", "4", "5", "6", "7", "9", "10"])          # 6 and 9 are mixed
    placed = bp.place(sample, ["0", "3"], set(prof), prof)
    assert len(placed) == 8 and {"0", "3"} <= set(placed)
    assert sorted(prof[c] for c in placed) == sorted(prof[c] for c in sample)   # same per-profile counts
    assert bp.place(sample, who, set(prof), prof) == sorted(who)                 # more attackers than places
    assert bp.place(sample, ["0"], set(prof) - {"0"}, prof) == sample            # a used attacker stays out
    assert [bp.attackers_for(s, 24) for _, s in bp.FRACTIONS] == [1, 3, 8]


def test_the_cache_returns_what_the_client_computes(fleet):
    """A statistics job reads the smoothing and grids of its instruction, not the activation
    scales: the honest reply to an instruction with other scales (and a newer version) is the
    cached one, bit for bit, when the client computes it again, and when it comes from the
    bench's store on disk (validated by the server as the reply to the new instruction)."""
    from quant.qparams import PointParams
    from quant.wire import Instruction
    from server.rounds import instructions_for

    cfg, fl = fleet
    config, _, _ = bp.rule_config(cfg.server, bp.RULE_SETS["exact"])
    _, s1, _ = _clean(fl, config)
    rnd, spec = _stage(config, ("stats",))[0]
    ins = instructions_for(s1, rnd, spec, config, fl.weights)["int8"]
    qp = ins.qparams
    other = qp.with_points({k: PointParams(p.spec, p.scale * 2, p.zero_point) for k, p in qp.points.items()},
                           version=qp.version + 1)
    ins2 = Instruction(ins.round, "stats", other, keys=ins.keys, grids=ins.grids, absmax=ins.absmax)
    assert bp.job_key(ins2, config) == bp.job_key(ins, config) and ins2.digest != ins.digest
    cid = next(c for c, p in fl.profile_of.items() if p == "int8")
    cached, n = fl.honest(cid, ins, config)
    store, fl.store = fl.store, None
    fl.honest_cache.clear()
    computed = fl.counts["honest_computed"]
    again, n2 = fl.honest(cid, ins2, config)            # the client computes it again
    assert fl.counts["honest_computed"] == computed + 1
    fl.store = store
    fl.honest_cache.clear()
    disk, n3 = fl.honest(cid, ins2, config)             # the stored reply, validated as ins2's
    assert fl.counts["honest_computed"] == computed + 1
    assert n == n2 == n3 and set(cached.stats) == set(again.stats) == set(disk.stats)
    for k, s in cached.stats.items():
        for t in (again.stats[k], disk.stats[k]):
            assert np.array_equal(s.counts, t.counts) and (s.min, s.max, s.n) == (t.min, t.max, t.n), k


def test_exact_rules_follow_the_attacks_robust_rules_bound_them(fleet):
    """One client's abs-max of 1e3 on channel 0: under 'max' the factor of that channel grows a
    hundredfold and more; under 'clipped' no factor exceeds absmax_clip^alpha x the one the honest
    clients' own largest abs-max gives. The lsq x8 attack (2 of the profile's 2 replies... and then
    1 of 4) moves the exact rule's scales by its share; the median keeps every learned log-scale
    within the honest clients' own steps when the attacker is one of four."""
    from server.aggregate import max_absmax, smoothquant_factors
    from server.rounds import instructions_for, smoothable_paths

    cfg, fl = fleet
    exact, _, _ = bp.rule_config(cfg.server, bp.RULE_SETS["exact"])
    robust, values, missing = bp.rule_config(cfg.server, bp.RULE_SETS["robust"])
    assert not missing and values["absmax_rule"] == "clipped" and values["lsq_rule"] == "median"
    who = bp.pick_attackers(fl.profile_of, 1)
    scout = _stage(exact, ("scout",))
    factors = {}
    for name, config in (("exact", exact), ("robust", robust)):
        s0, s1, _ = _clean(fl, config)
        st, recs = bp.run_rounds(fl, s0, scout, config, _attack("scout-absmax"), who)
        assert recs[0]["rejected"] == [] and recs[0]["attackers_in_sample"] == 1
        factors[name] = (st.qparams["int8"].smoothing, s1.qparams["int8"].smoothing)
    # the honest clients' own factors, from their cached scouting replies
    s0 = _clean(fl, exact)[0]
    ins = instructions_for(s0, *scout[0], exact, fl.weights)
    honest = [fl.honest(c, ins[p], exact)[0].channel_absmax for c, p in fl.profile_of.items() if c not in who]
    paths = smoothable_paths(s0.qparams, exact, fl.weights)
    alpha = exact.smoothing.alpha_for("int8")
    merged = max_absmax(honest)
    own = smoothquant_factors({p: merged[f"{p}:input"] for p in paths}, fl.weights, alpha,
                              (exact.smoothing.min_factor, exact.smoothing.max_factor))
    attacked, clean = factors["exact"]
    assert min(attacked[p][0] / clean[p][0] for p in paths) > 100
    attacked, _ = factors["robust"]
    bound = robust.absmax_clip ** alpha * (1 + 1e-5)
    for p in paths:
        assert np.all(attacked[p] <= own[p] * bound), p

    # lsq: every client learns, so the int8 profile has 4 replies of which 1 is the attacker's
    lsq = [(r, s.model_copy(update={"fraction": 1.0})) for r, s in _stage(exact, ("lsq",))]
    for name, config in (("exact", exact), ("robust", robust)):
        _, _, s3 = _clean(fl, config)
        st, recs = bp.run_rounds(fl, s3, lsq, config, _attack("lsq-scale-up"), who)
        assert recs[0]["rejected"] == [] and recs[0]["by_profile"]["int8"] == {"replies": 4, "attackers": 1}
        ref, _ = bp.run_rounds(fl, s3, lsq, config)
        ratio = bp.moved(st, ref)["int8"]
        if name == "exact":      # weights capped at the median claim: the attacker is a quarter of the mean
            assert ratio["scale_ratio_min"] > math.exp(math.log(8) / 4) * 0.9
        else:
            ins = instructions_for(s3, *lsq[0], config, fl.weights)["int8"]
            steps = np.stack([np.concatenate([np.ravel(fl.honest(c, ins, config)[0].delta_log_s[k]) for k in ins.keys])
                              for c, p in fl.profile_of.items() if p == "int8" and c not in who])
            got = np.concatenate([np.ravel(np.log(st.qparams["int8"].points[k].scale.astype(np.float64))
                                           - np.log(s3.qparams["int8"].points[k].scale.astype(np.float64)))
                                  for k in ins.keys])
            assert np.all(got <= steps.max(axis=0) + 1e-5) and np.all(got >= steps.min(axis=0) - 1e-5)


def test_command_writes_and_merges_rule_sets(prepared, tmp_path):
    out, js, md = tmp_path / "bench", tmp_path / "p.json", tmp_path / "p.md"
    common = ["--config", str(SMOKE), "--prepared-from", str(prepared), "--out", str(out), "--json", str(js),
              "--md", str(md), "--attacks", "stats-outside-1e4", "lsq-scale-up", "--shares", "30%"]
    bp.main([*common, "--rules", "exact"])
    res = bp.main([*common, "--rules", "robust"])
    saved = json.loads(js.read_text())
    assert list(saved["rule_sets"]) == ["exact", "robust"] == list(res["rule_sets"])
    for name, rs in saved["rule_sets"].items():
        assert not rs["missing_fields"]
        assert set(rs["clean"]["ppl"]) == {"stats", "lsq"}
        assert [(r["attack"], r["share"], r["attackers"]) for r in rs["rows"]] == [
            ("stats-outside-1e4", "30%", 2), ("lsq-scale-up", "30%", 2)]
        for r in rs["rows"]:
            assert r["attacker_replies_rejected"] == 0
            assert all(math.isfinite(v) for v in r["ppl"].values())
            assert r["holds"] == (r["worst_change_pct"] <= 5.0)
            assert set(r["control_ppl"]) == set(r["ppl"]) == set(r["change_vs_control_pct"])
    assert saved["machine"]["cpu_model"] and saved["wall_s"] > 0 and saved["shares"]["30%"] == 2
    text = md.read_text()
    assert text.count("| exact |") == 4 and text.count("| robust |") == 4 and "stats* x2" in text and "lsq*" in text

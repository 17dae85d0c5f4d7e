"""Server rounds as pure functions: sampling, federated statistics equal to pooled calibration,
server optimizers on (log s, beta), rounds that change nothing, robust rules against poison."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from quant.configfile import ConfigError, load_config
from quant.ptq import activation_qparams
from quant.qparams import PointParams, QParams
from quant.spec import activation_spec, weight_spec
from quant.stats import observe
from quant.wire import LsqReply, ScoutReply, StatsReply
from server.config import RoundSpec, ServerConfig
from server.rounds import (Accepted, activation_keys, apply_round, instructions_for, sample_by_profile,
                           sample_clients)
from server.state import initial_state, states_equal
from server.validate import Rejection, ValidationConfig, validate_eval_metrics

KEYS = ("blk.q:input", "blk.o:input", "blk.attn:other")
PROFILES = {"u8": activation_spec(8), "u4": activation_spec(4), "s16": activation_spec(16)}


def make_initial() -> dict[str, QParams]:
    out = {}
    for name, spec in PROFILES.items():
        z = spec.symmetric_zero_point if spec.symmetric else (spec.qmax + 1) // 2
        pts = {k: PointParams(spec, np.float32(0.05), np.array(z, dtype=spec.numpy_dtype)) for k in KEYS}
        pts["blk.q:weight"] = PointParams(weight_spec(8), np.full(4, 0.01), np.zeros(4))
        out[name] = QParams(pts, "fp-test", 0)
    return out


def client_data(n_clients: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per client, per point: activations of different scales; the ':other' point non-negative."""
    rng = np.random.default_rng(seed)
    data = {}
    for i in range(n_clients):
        scale = 1.0 + 0.3 * i
        data[f"c{i:02d}"] = {
            KEYS[0]: (rng.standard_t(4, size=(12, 8)) * scale).astype(np.float32),
            KEYS[1]: (rng.normal(0.5, 2.0, size=(12, 8)) * scale).astype(np.float32),
            KEYS[2]: rng.random(size=(12, 8)).astype(np.float32) ** 3}
    return data


def profile_of(cid: str) -> str:
    return list(PROFILES)[int(cid[1:]) % len(PROFILES)]


# the rules before bounded influence: exact sums and maxima, the example-weighted mean of deltas
EXACT = dict(stats_rule="sum", absmax_rule="max", lsq_rule="mean", trim=0.1)


def config(**kw) -> ServerConfig:
    base = dict(schedule=[{"job": "scout"}, {"job": "stats", "repeat": 3, "fraction": 0.34},
                          {"job": "lsq"}, {"job": "eval"}], bins=64, grid_quantile=1.0)
    return ServerConfig(**{**base, **kw})


def scout_replies(data, cids, absmax: bool = False):
    """Scouting replies by profile; with ``absmax``, each carries its ``blk.q`` input's per-channel abs-max."""
    out = {}
    for c in cids:
        ranges = {k: (float(x.min()), float(x.max())) for k, x in data[c].items()}
        channels = {"blk.q:input": np.abs(data[c][KEYS[0]]).max(axis=0)} if absmax else {}
        out.setdefault(profile_of(c), []).append(
            Accepted(c, 12, ScoutReply(ranges, {k: x.size for k, x in data[c].items()}, channels)))
    return out


def stats_replies(data, cids, inss):
    out = {}
    for c in cids:
        ins = inss[profile_of(c)]
        out.setdefault(profile_of(c), []).append(
            Accepted(c, 12, StatsReply({k: observe(data[c][k], ins.grids[k]) for k in ins.keys})))
    return out


def after_scout(cfg, data):
    state = initial_state(make_initial(), "d")
    state, m = apply_round(state, 1, cfg.schedule[0], scout_replies(data, sorted(data)), [], cfg)
    assert m["applied"] and set(state.grids) == set(KEYS)
    return state


# ---------------------------------------------------------------------------------------------

def test_sampling_is_deterministic_and_without_replacement_across_stats_rounds():
    roster = [f"dev-{i}" for i in range(23)]
    used: list[str] = []
    seen = []
    for rnd in range(2, 8):
        s = sample_clients(roster, used, 0.2, 1, seed=7, round=rnd)
        assert s == sample_clients(list(reversed(roster)), list(used), 0.2, 1, 7, rnd)   # order-free
        assert len(s) == min(5, 23 - len(used)) and not set(s) & set(used)
        used += s
        seen.append(s)
    assert sorted(used) == sorted(roster)                   # every client exactly once
    assert sample_clients(roster, used, 0.2, 1, 7, 8) == []
    assert sample_clients(roster, [], 0.2, 1, 7, 2) != sample_clients(roster, [], 0.2, 1, 8, 2)
    assert len(sample_clients(roster, [], 0.01, 4, 0, 1)) == 4            # min_clients
    assert len(sample_clients(roster[:3], [], 0.5, 10, 0, 1)) == 3        # as many as there are
    assert len(sample_clients([f"c{i}" for i in range(10)], [], 0.3, 1, 0, 1)) == 3   # no float ceil surprise


def test_sampling_by_profile_gives_every_profile_its_fraction_of_every_round():
    profile_of = {f"dev-{i}": ("mixed" if i % 3 == 0 else "int8") for i in range(24)}   # 8 mixed, 16 int8
    mixed = {c for c, p in profile_of.items() if p == "mixed"}
    for rnd in range(1, 11):
        s = sample_by_profile(profile_of, [], 0.33, 1, seed=0, round=rnd)
        assert s == sample_by_profile(dict(reversed(list(profile_of.items()))), [], 0.33, 1, 0, rnd)
        assert len(set(s) & mixed) == 3 and len(set(s) - mixed) == 6      # ceil(0.33 x 8), ceil(0.33 x 16)
    # what stratifying fixes: a uniform draw of 3 of 24 mostly leaves a one-client profile out
    lone = {**{f"dev-{i}": "int8" for i in range(23)}, "npu": "mixed"}
    uniform = [("npu" in sample_clients(sorted(lone), [], 0.1, 1, 0, rnd)) for rnd in range(1, 11)]
    assert not all(uniform)
    assert all("npu" in sample_by_profile(lone, [], 0.1, 1, 0, rnd) for rnd in range(1, 11))
    # min_clients and "without replacement" (stats rounds) hold within each profile
    assert len(sample_by_profile({"a": "x", "b": "x", "c": "y"}, [], 0.1, 2, 0, 1)) == 3
    assert sample_by_profile(profile_of, sorted(mixed), 0.33, 1, 0, 1) and \
        not set(sample_by_profile(profile_of, sorted(mixed), 0.33, 1, 0, 1)) & mixed
    # the profile streams are independent of each other: a profile's draw ignores the others' members
    only_mixed = {c: p for c, p in profile_of.items() if p == "mixed"}
    assert set(sample_by_profile(profile_of, [], 0.33, 1, 0, 5)) & mixed == \
        set(sample_by_profile(only_mixed, [], 0.33, 1, 0, 5))


def test_federated_statistics_equal_pooled_calibration_bit_for_bit_for_every_profile():
    cfg = config(**EXACT)
    data = client_data(10)
    state = after_scout(cfg, data)
    grids0 = dict(state.grids)
    spec = cfg.schedule[1]
    for rnd in (2, 3, 4):
        sampled = sample_clients(sorted(data), state.used, spec.fraction, spec.min_clients, cfg.seed, rnd)
        assert sampled, rnd
        inss = instructions_for(state, rnd, spec, cfg)
        assert all(set(i.keys) == set(KEYS) for i in inss.values())
        state, m = apply_round(state, rnd, spec, stats_replies(data, sampled, inss), [], cfg)
        assert m["applied"] and m["widened"] == []
    assert sorted(state.used) == sorted(data)               # every client counted once
    assert state.grids == grids0
    pooled = {k: np.concatenate([data[c][k].ravel() for c in sorted(data)]) for k in KEYS}
    for k in KEYS:
        assert state.sums[k] == observe(pooled[k], grids0[k])
    for prof, qp in state.qparams.items():
        central = activation_qparams({k: observe(pooled[k], grids0[k]) for k in KEYS},
                                     {k: qp.points[k].spec for k in KEYS}, cfg.calibrator)
        assert qp.version >= 1
        for k in KEYS:
            got = qp.points[k]
            assert got.scale.tobytes() == central[k].scale.tobytes(), (prof, k)
            assert got.zero_point.dtype == central[k].zero_point.dtype
            assert got.zero_point.tobytes() == central[k].zero_point.tobytes(), (prof, k)
        assert np.array_equal(qp.points["blk.q:weight"].scale, np.full(4, 0.01, np.float32))  # not an activation
    # the profiles really differ: one merged histogram, calibrated per bit width
    assert state.qparams["u8"].points[KEYS[0]].scale != state.qparams["u4"].points[KEYS[0]].scale


def test_stats_widen_the_grid_and_rebin_the_sums_when_much_mass_falls_outside():
    cfg = config(widen_threshold=0.01, **EXACT)       # the robust rules widen by round_factor at most
    data = client_data(4)
    state = after_scout(cfg, data)
    g0 = state.grids[KEYS[0]]
    wide = {c: {k: (v * (30.0 if k == KEYS[0] else 1.0)).astype(np.float32) for k, v in d.items()}
            for c, d in data.items()}
    spec = cfg.schedule[1]
    inss = instructions_for(state, 2, spec, cfg)
    new, m = apply_round(state, 2, spec, stats_replies(wide, ["c00", "c01"], inss), [], cfg)
    assert m["widened"] == [KEYS[0]]
    s = new.sums[KEYS[0]]
    g1 = new.grids[KEYS[0]]
    assert s.grid == g1 and g1.width > g0.width and g1.lo <= s.min and s.max < g1.hi
    assert s.n == sum(wide[c][KEYS[0]].size for c in ("c00", "c01"))
    assert new.grids[KEYS[1]] == state.grids[KEYS[1]]
    assert instructions_for(new, 3, spec, cfg)["u8"].grids[KEYS[0]] == g1
    # the next round collects on the new grid; its values land in bins, the old outside mass stays
    inss = instructions_for(new, 3, spec, cfg)
    newer, m = apply_round(new, 3, spec, stats_replies(wide, ["c02"], inss), [], cfg)
    assert newer.sums[KEYS[0]].below + newer.sums[KEYS[0]].above == s.below + s.above
    assert m["widened"] == []


def _lsq_replies(deltas: dict[str, list[float]], beta=0.0, examples=None):
    """Per profile, one reply per delta, the same delta for every learned point."""
    out = {}
    for prof, ds in deltas.items():
        for i, d in enumerate(ds):
            r = LsqReply({k: np.float32(d) for k in KEYS}, {k: np.float32(beta) for k in KEYS}, 2.0, 1.5)
            out.setdefault(prof, []).append(Accepted(f"{prof}-{i}", (examples or [1] * len(ds))[i], r))
    return out


def test_lsq_round_moves_log_s_and_beta_as_fedavg_says():
    """The example-weighted mean, each claim capped at the median claim: the third client claims
    10^6 examples and weighs 3, as the median client does."""
    cfg = config(server_lr=0.5, lsq_rule="mean")
    state = initial_state(make_initial(), "d")
    spec = RoundSpec(job="lsq")
    deltas = {"u8": [0.02, 0.08, 0.0], "s16": [-0.04, 0.0, 0.0]}
    new, m = apply_round(state, 1, spec, _lsq_replies(deltas, beta=0.01, examples=[3, 1, 10**6]), [], cfg)
    assert m["applied"] and set(m["lsq"]) == {"u8", "s16"}
    for prof, ds in deltas.items():
        mean = (3 * ds[0] + 1 * ds[1]) / 7
        qp0, qp1 = state.qparams[prof], new.qparams[prof]
        assert qp1.version == qp0.version + 1
        for k in KEYS:
            p0 = qp0.points[k]
            ls0 = math.log(float(p0.scale))
            b0 = -float(p0.zero_point) * math.exp(ls0)
            d32 = (3 * float(np.float32(ds[0])) + float(np.float32(ds[1]))) / 7
            assert new.learned[prof][f"log_s/{k}"] == pytest.approx(ls0 + 0.5 * d32, abs=1e-15)
            assert abs(d32 - mean) < 1e-8
            beta = b0 + 0.5 * float(np.float32(0.01))
            assert new.learned[prof][f"beta/{k}"] == pytest.approx(beta, abs=1e-15)
            s = np.float32(math.exp(ls0 + 0.5 * d32))
            assert qp1.points[k].scale == s
            spec_k = p0.spec
            want_z = spec_k.symmetric_zero_point if spec_k.symmetric else \
                np.clip(np.rint(-beta / math.exp(ls0 + 0.5 * d32)), spec_k.qmin, spec_k.qmax)
            assert int(qp1.points[k].zero_point) == int(want_z)
        assert qp1.points["blk.q:weight"] is qp0.points["blk.q:weight"]      # not learned
    assert new.qparams["u4"] is state.qparams["u4"]                        # no replies: untouched
    assert states_equal(state, initial_state(make_initial(), "d"))        # input not modified


def test_lsq_round_with_fedadam_follows_reddi_et_al_for_two_rounds():
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    cfg = config(server_opt="fedadam", server_lr=lr, adam_b1=b1, adam_b2=b2, adam_eps=tau, lsq_rule="median")
    state = initial_state(make_initial(), "d")
    spec = RoundSpec(job="lsq")
    k = KEYS[0]
    x = math.log(float(state.qparams["u8"].points[k].scale))
    m = 0.0
    v = tau * tau
    for rnd, ds in ((1, [0.01, 0.03, 0.02]), (2, [-0.01, 0.0, 0.05])):
        state, _ = apply_round(state, rnd, spec, _lsq_replies({"u8": ds}), [], cfg)
        d = float(np.median(np.float32(ds).astype(np.float64)))
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (math.sqrt(v) + tau)
        assert state.learned["u8"][f"log_s/{k}"] == pytest.approx(x, rel=1e-13)
        assert state.moments["u8"][f"m/log_s/{k}"] == pytest.approx(m, rel=1e-13)
        assert state.qparams["u8"].version == rnd
    assert state.qparams["u8"].points[k].scale == np.float32(math.exp(x))


def test_a_round_with_only_invalid_replies_changes_nothing_but_the_round_counter():
    cfg = config()
    data = client_data(6)
    state = after_scout(cfg, data)
    spec = cfg.schedule[1]
    inss = instructions_for(state, 2, spec, cfg)
    state, _ = apply_round(state, 2, spec, stats_replies(data, ["c00", "c01"], inss), [], cfg)
    bad = [Rejection("nan"), Rejection("timeout"), "client:job_failed"]
    for rnd, sp, replies in [(3, spec, {}), (4, RoundSpec(job="lsq"), {}), (5, RoundSpec(job="scout"), {}),
                             (6, RoundSpec(job="stats", min_replies=3),
                              stats_replies(data, ["c02", "c03"], instructions_for(state, 6, spec, cfg))),
                             (7, RoundSpec(job="lsq", min_replies=3), _lsq_replies({"u8": [0.1, 0.1]}))]:
        new, m = apply_round(state, rnd, sp, replies, bad, cfg)
        assert not m["applied"] and m["rejections"] == {"client:job_failed": 1, "nan": 1, "timeout": 1}
        assert new.round == rnd
        assert states_equal(replace(new, round=state.round), state)
        assert new.used == state.used == ("c00", "c01")     # the sampled clients are not marked used
        for prof in PROFILES:
            assert new.qparams[prof].version == state.qparams[prof].version
    with pytest.raises(ValueError, match="already done"):
        apply_round(state, 2, spec, {}, [], cfg)


def test_poisoned_lsq_replies_are_bounded_by_the_median_and_not_by_the_mean():
    honest = [0.010, 0.015, 0.020, 0.025, 0.030]
    poison = [math.log(8) * 0.99] * 2                       # valid-looking: within max_log_scale_step
    state = initial_state(make_initial(), "d")
    k = KEYS[1]
    ls0 = math.log(float(state.qparams["u8"].points[k].scale))
    moved = {}
    for rule in ("median", "trimmed", "mean"):
        cfg = config(lsq_rule=rule, trim=0.3)
        new, _ = apply_round(state, 1, RoundSpec(job="lsq"), _lsq_replies({"u8": honest + poison}), [], cfg)
        moved[rule] = new.learned["u8"][f"log_s/{k}"] - ls0
    for rule in ("median", "trimmed"):
        assert min(honest) - 1e-7 <= moved[rule] <= max(honest) + 1e-7, rule
    assert moved["mean"] > 0.5                               # dragged by 2/7 of the poison


def test_eval_round_reports_token_weighted_perplexity_and_validates_metrics():
    cfg = config()
    state = initial_state(make_initial(), "d")
    ins = instructions_for(state, 1, RoundSpec(job="eval"), cfg)["u8"]
    ok = validate_eval_metrics({"num-examples": 4, "tokens": 100, "nll_sum": 200.0, "version": 0}, ins,
                               cfg.validation)
    ok2 = validate_eval_metrics({"num-examples": 4, "tokens": 300, "nll_sum": 300.0, "version": 0}, ins,
                                cfg.validation)
    for bad, code in [({"num-examples": 4, "tokens": 100, "nll_sum": float("nan"), "version": 0}, "nan"),
                      ({"num-examples": 4, "tokens": 100, "nll_sum": 1.0, "version": 3}, "wrong_version"),
                      ({"num-examples": 0, "tokens": 100, "nll_sum": 1.0, "version": 0}, "examples"),
                      ({"num-examples": 4, "tokens": 1.5, "nll_sum": 1.0, "version": 0}, "count_mismatch"),
                      ({"num-examples": 4, "tokens": 9, "nll_sum": "x", "version": 0}, "nan")]:
        assert validate_eval_metrics(bad, ins, ValidationConfig()).code == code
    new, m = apply_round(state, 1, RoundSpec(job="eval"),
                         {"u8": [Accepted("a", 4, ok), Accepted("b", 4, ok2)]}, [], cfg)
    assert m["eval"]["u8"]["perplexity"] == pytest.approx(math.exp(500 / 400))
    assert m["eval_all"]["tokens"] == 400
    assert states_equal(replace(new, round=0), state)


def test_instructions_per_profile():
    cfg = config(learn={"which": "all", "steps": 2})
    state = initial_state(make_initial(), "d")
    lsq = instructions_for(state, 1, RoundSpec(job="lsq"), cfg)
    assert set(lsq) == set(PROFILES) and "blk.q:weight" in lsq["u8"].keys
    scout = instructions_for(state, 1, RoundSpec(job="scout"), config())
    assert scout["u4"].keys == tuple(sorted(KEYS)) == tuple(activation_keys(state.qparams["u4"]))
    # only what a run can change travels: activation points here, weights too when learned
    full = state.qparams["u4"]
    sent = scout["u4"].qparams
    assert set(sent.points) == set(activation_keys(full)) < set(full.points)
    assert (sent.version, sent.model) == (full.version, full.model)
    assert all(sent.points[k] is full.points[k] for k in sent.points)
    assert set(lsq["u8"].qparams.points) == set(state.qparams["u8"].points)


def test_a_round_for_some_profiles_asks_and_changes_only_them():
    """``profiles`` on a schedule entry: the others get no instruction (so no client of theirs is
    sampled) and keep their parameters; a scout round asks everyone; the digest of a schedule
    without it is what it was."""
    cfg = config(lsq_rule="mean")
    state = initial_state(make_initial(), "d")
    spec = RoundSpec(job="lsq", profiles=("u8",))
    assert set(instructions_for(state, 1, spec, cfg)) == {"u8"}
    assert set(instructions_for(state, 1, RoundSpec(job="eval", profiles=("s16", "u4")), cfg)) == {"s16", "u4"}
    new, m = apply_round(state, 1, spec, _lsq_replies({"u8": [0.05, 0.05]}), [], cfg)
    assert m["applied"] and set(m["lsq"]) == {"u8"}
    assert new.qparams["u8"].version == 1 and new.qparams["u4"] is state.qparams["u4"]
    with pytest.raises(ValueError, match=r"schedule\[0\]: a scout round asks every profile"):
        ServerConfig(schedule=[{"job": "scout", "profiles": ["u8"]}])
    for bad in ([], ["u8", "u8"]):
        with pytest.raises(ValueError, match="profiles"):
            ServerConfig(schedule=[{"job": "lsq", "profiles": bad}])
    plain = ServerConfig(schedule=[{"job": "scout"}, {"job": "lsq", "fraction": 0.3}], **EXACT)
    some = ServerConfig(schedule=[{"job": "scout"}, {"job": "lsq", "fraction": 0.3, "profiles": ["u8"]}], **EXACT)
    assert plain.digest() == "eae493354fd4270f" and some.digest() != plain.digest()


def test_a_profile_with_every_input_per_token_sits_out_statistics_and_learned_ranges():
    """A profile quantizing every Linear input per token keeps only weight points: a statistics or
    learned-range job would have nothing to do on its clients, so they get no instruction (and are
    not sampled), while scouting (its smoothing factors) and evaluation still ask them."""
    initial = make_initial()
    w = initial["u8"].points["blk.q:weight"]
    initial["u8"] = QParams({"blk.q:weight": w}, "fp-test", 0)
    state = initial_state(initial, "d")
    for job in ("stats", "lsq"):
        assert set(instructions_for(state, 1, RoundSpec(job=job), config())) == {"u4", "s16"}, job
    for job in ("scout", "eval"):
        assert "u8" in instructions_for(state, 1, RoundSpec(job=job), config()), job
    # weights learned too (learn.which = "all"): a weight point is something to move
    assert "u8" in instructions_for(state, 1, RoundSpec(job="lsq"), config(learn={"which": "all", "steps": 2}))


def test_config_rejects_impossible_schedules_naming_the_entry(tmp_path):
    with pytest.raises(ValueError, match="schedule is empty"):
        ServerConfig(schedule=[])
    with pytest.raises(ValueError, match=r"schedule\[1\]: stats before any scout"):
        ServerConfig(schedule=[{"job": "eval"}, {"job": "stats"}])
    with pytest.raises(ValueError, match=r"schedule\[2\]: scout after a stats"):
        ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}, {"job": "scout"}])
    ServerConfig(schedule=[{"job": "lsq"}, {"job": "eval"}])                  # nothing to scout: fine
    for bad in ({"job": "lsq", "fraction": 0}, {"job": "lsq", "repeat": 0}, {"job": "x"},
                {"job": "lsq", "extra": 1}):
        with pytest.raises(ValueError):
            ServerConfig(schedule=[bad])
    with pytest.raises(ValueError, match="which"):
        ServerConfig(schedule=[{"job": "lsq"}], learn={"which": "weights"})
    toml = tmp_path / "server.toml"
    toml.write_text('seed = 3\nbins = 256\nlsq_rule = "median"\n[[schedule]]\njob = "scout"\n'
                    '[[schedule]]\njob = "stats"\nrepeat = 2\nfraction = 0.5\nmin_replies = 2\n'
                    '[calibrator]\nmethod = "percentile"\n[learn]\nsteps = 4\n[validation]\nmax_examples = 99\n')
    cfg = load_config(toml, ServerConfig)
    assert [r for r, _ in cfg.rounds()] == [1, 2, 3] and cfg.rounds()[2][1].min_replies == 2
    assert cfg.calibrator.method == "percentile" and cfg.validation.max_examples == 99
    assert cfg.learn.steps == 4 and cfg.learn.given() == {"steps": 4} and cfg.learn_json() == '{"steps": 4}'
    assert cfg.digest() == cfg.model_copy(update={"reply_timeout_s": 5.0}).digest()
    assert cfg.digest() != cfg.model_copy(update={"seed": 4}).digest()
    # by_profile came later: schedules without it keep the digest their checkpoints carry
    plain = ServerConfig(schedule=[{"job": "scout"}, {"job": "lsq", "fraction": 0.3}], **EXACT)
    assert plain.digest() == "eae493354fd4270f"    # what the code before by_profile computed
    assert ServerConfig(schedule=[{"job": "scout"}, {"job": "lsq", "fraction": 0.3}]).digest() != plain.digest()
    strat = ServerConfig(schedule=[{"job": "scout"}, {"job": "lsq", "fraction": 0.3, "by_profile": True}], **EXACT)
    assert strat.digest() != plain.digest()
    toml.write_text('[[schedule]]\njob = "stats"\n')
    with pytest.raises(ConfigError, match="stats before any scout"):
        load_config(toml, ServerConfig)


def test_typed_learn_table_keeps_the_digest_and_the_message(tmp_path):
    """``learn`` was a plain table before it was typed (quant.learn_config.LearnConfig): the digest
    (what a checkpoint resumes under) and the JSON an lsq client gets hold the fields the user set,
    as set (``lr = 1`` stays 1, an unset batch_size is not sent: the client takes the message's)."""
    sched = [{"job": "scout"}, {"job": "stats"}, {"job": "lsq", "fraction": 0.3}]
    full = {"steps": 4, "batch_size": 2, "lr": 0.03, "beta_step_lsb": 0.5, "loss": "distill", "which": "all"}
    pinned = [  # digest and message computed by the code before learn was typed
        (full, "3afeb72e1acd59df",
         '{"batch_size": 2, "beta_step_lsb": 0.5, "loss": "distill", "lr": 0.03, "steps": 4, "which": "all"}'),
        ({"steps": 4, "lr": 1, "beta_step_lsb": 2}, "b8285956b83e2c0c", '{"beta_step_lsb": 2, "lr": 1, "steps": 4}'),
        ({"steps": 2, "batch_size": 2}, "82e9f7d178d388f2", '{"batch_size": 2, "steps": 2}'),
        ({}, "558aa3534ad1e4f3", "{}"),
    ]
    for learn, digest, message in pinned:
        cfg = ServerConfig(schedule=sched, learn=learn, **EXACT)
        assert (cfg.digest(), cfg.learn_json()) == (digest, message), learn
        again = ServerConfig.model_validate(cfg.model_dump())        # as --rounds rebuilds it
        assert (again.digest(), again.learn_json()) == (digest, message)
        assert cfg.model_dump(mode="json")["learn"] == learn
    cfg = ServerConfig(schedule=sched, learn=full)
    assert cfg.learn.which == "all" and cfg.learn.lr == 0.03 and isinstance(cfg.learn.lr, float)
    assert ServerConfig(schedule=sched).learn.which == "activations"
    toml = tmp_path / "server.toml"
    toml.write_text('stats_rule = "sum"\nabsmax_rule = "max"\nlsq_rule = "mean"\ntrim = 0.1\n'
                    '[[schedule]]\njob = "scout"\n[[schedule]]\njob = "stats"\n[[schedule]]\njob = "lsq"\n'
                    'fraction = 0.3\n[learn]\nsteps = 4\nlr = 1\nbeta_step_lsb = 2\n')
    assert load_config(toml, ServerConfig).digest() == "b8285956b83e2c0c"


def test_bad_learn_tables_name_the_key():
    """Unknown keys and bad values are refused where the config is read, naming ``server.learn.<key>``
    (they used to reach the clients, which refused the job)."""
    from pathlib import Path

    from simulation.config import SimulationConfig

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    for key, value, says in (("bogus", 1, "server.learn.bogus: Extra inputs are not permitted"),
                             ("which", "weights", "server.learn.which: Input should be 'activations' or 'all'"),
                             ("lr", 0, "server.learn.lr: Input should be greater than 0"),
                             ("steps", "many", "server.learn.steps: Input should be a valid integer")):
        with pytest.raises(ConfigError) as e:
            load_config(smoke, SimulationConfig, {f"server.learn.{key}": value})
        assert says in str(e.value), str(e.value)


def smoothing_case():
    """Smoothing at 0.8 (u4: 0.5; s16 unsmoothed), clients whose ``blk.q`` input has an outlier
    channel, and ``blk.q``'s float weight."""
    cfg = config(smoothing={"alpha": 0.8, "profiles": {"u4": 0.5}, "skip_profiles": ["s16"]},
                 schedule=[{"job": "scout"}, {"job": "stats"}])
    data = client_data(6)
    for i, c in enumerate(sorted(data)):
        data[c][KEYS[0]][:, 5] *= 40.0 + i                              # an outlier channel
    w = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    return cfg, data, w, {"blk.q": w}


def test_scouting_with_smoothing_folds_exact_factors_into_every_profile():
    """With ``smoothing`` the scouting round asks for the Linear inputs' per-channel abs-max; the
    server merges them by max (the pooled data's abs-max, exactly), computes factors from them and
    the float weight at each profile's strength (u8: 0.8; u4: 0.5; s16: skipped), folds them in
    (weight point = min-max of W * m; version + 1), and the grid of a smoothed input -- kept apart
    per strength -- is what scouting x / m itself gives. The statistics round then calibrates a
    smoothed input from the histograms of x / m of the clients holding that m."""
    from quant.smoothing import smoothed_weight_point, smoothing_factors
    from server.aggregate import grids_from_scouting, ranges_for_profile

    cfg, data, w, weights = smoothing_case()                          # blk.o has no weight here: not smoothed
    initial = make_initial()
    for prof in ("u8", "u4"):                                           # what prepare gives smoothed profiles
        initial[prof] = QParams(initial[prof].points, "fp-test", 0, {"blk.q": np.ones(8, np.float32)})
    state = initial_state(initial, "d")
    ins = instructions_for(state, 1, cfg.schedule[0], cfg, weights)
    assert all(i.absmax == {"blk.q:input": 8} for i in ins.values())
    replies = scout_replies(data, sorted(data), absmax=True)
    new, m = apply_round(state, 1, cfg.schedule[0], replies, [], cfg, weights)
    assert m["smoothed"] == {"u8": 1, "u4": 1}
    pooled = np.concatenate([data[c][KEYS[0]] for c in sorted(data)])
    assert new.qparams["s16"] is state.qparams["s16"]
    for prof, alpha in (("u8", 0.8), ("u4", 0.5)):
        qp = new.qparams[prof]
        factors = smoothing_factors(np.abs(pooled).max(axis=0), w, alpha)
        assert factors[5] > 5 * np.median(factors)
        assert qp.version == 1 and set(qp.smoothing) == {"blk.q"}
        np.testing.assert_array_equal(qp.smoothing["blk.q"], factors)
        expect = smoothed_weight_point(w, factors, qp.points["blk.q:weight"].spec)
        np.testing.assert_array_equal(qp.points["blk.q:weight"].scale, expect.scale)
        assert qp.points[KEYS[1]] is state.qparams[prof].points[KEYS[1]]          # unsmoothed input: untouched
        smoothed = [ScoutReply({KEYS[0]: (float((x := data[c][KEYS[0]] / factors).min()), float(x.max()))},
                               {KEYS[0]: x.size}) for c in sorted(data)]
        grid = grids_from_scouting(smoothed, cfg.bins, cfg.grid_margin, cfg.grid_quantile)[KEYS[0]]
        assert new.grids[f"{KEYS[0]}@{alpha:g}"] == grid
    assert new.grids[KEYS[0]] == after_scout(config(), data).grids[KEYS[0]]   # s16: the unsmoothed grid

    inss = instructions_for(new, 2, cfg.schedule[1], cfg, weights)
    assert inss["u4"].grids[KEYS[0]] == new.grids[f"{KEYS[0]}@0.5"]
    stats = {}
    for c in sorted(data):
        prof = profile_of(c)
        m_ = new.qparams[prof].smoothing.get("blk.q", np.ones(8, np.float32))
        x = {k: (v / m_ if k == KEYS[0] else v) for k, v in data[c].items()}
        stats.setdefault(prof, []).append(Accepted(c, 12, StatsReply(
            {k: observe(x[k], inss[prof].grids[k]) for k in inss[prof].keys})))
    done, _ = apply_round(new, 2, cfg.schedule[1], stats, [], cfg, weights)
    for prof in ("u8", "u4", "s16"):
        qp = new.qparams[prof]
        m_ = qp.smoothing.get("blk.q", np.ones(8, np.float32))
        # a smoothed input: the histograms of x / m come from the clients that hold m (this
        # profile's); an unsmoothed one (s16) pools every client's, whatever its profile
        holders = [c for c in sorted(data) if prof == "s16" or profile_of(c) == prof]
        x = np.concatenate([data[c][KEYS[0]] / m_ for c in holders])
        ref = ranges_for_profile({KEYS[0]: observe(x, inss[prof].grids[KEYS[0]])},
                                 {KEYS[0]: qp.points[KEYS[0]].spec}, cfg.calibrator)[KEYS[0]]
        np.testing.assert_array_equal(done.qparams[prof].points[KEYS[0]].scale, ref.scale)
        np.testing.assert_array_equal(done.qparams[prof].points[KEYS[0]].zero_point, ref.zero_point)
    with pytest.raises(ValueError, match="weights"):
        apply_round(state, 1, cfg.schedule[0], replies, [], cfg)


def test_a_per_token_input_is_smoothed_and_each_group_scouts_its_own_inputs():
    """A Linear whose input one profile quantizes per token (no point: ``meta["per_token"]``) is
    still smoothed: the scouting round asks every client for its abs-max (a key of the instruction
    though not a point of that profile), and the profile gets the factors and the folded weight
    point, at its own strength, without an input point appearing. The abs-max asked for is the
    union of what each smoothing group smooths, not only what every profile shares."""
    import json

    from quant.smoothing import smoothed_weight_point, smoothing_factors
    from server.rounds import absmax_request, smoothable_paths

    cfg, data, w, weights = smoothing_case()
    initial = make_initial()
    per_token = {"per_token": json.dumps(["blk.q"])}
    u8 = {k: v for k, v in initial["u8"].points.items() if k != KEYS[0]}
    initial["u8"] = QParams(u8, "fp-test", 0, {"blk.q": np.ones(8, np.float32)}, per_token)
    initial["u4"] = QParams(initial["u4"].points, "fp-test", 0, {"blk.q": np.ones(8, np.float32)})
    assert smoothable_paths({"u8": initial["u8"]}, cfg, weights) == ["blk.q"]
    state = initial_state(initial, "d")
    ins = instructions_for(state, 1, cfg.schedule[0], cfg, weights)
    assert all(i.absmax == {"blk.q:input": 8} and KEYS[0] in i.keys for i in ins.values())
    assert KEYS[0] not in activation_keys(ins["u8"].qparams)
    replies = scout_replies(data, sorted(data), absmax=True)
    new, m = apply_round(state, 1, cfg.schedule[0], replies, [], cfg, weights)
    assert m["smoothed"] == {"u8": 1, "u4": 1}
    pooled = np.abs(np.concatenate([data[c][KEYS[0]] for c in sorted(data)])).max(axis=0)
    for prof, alpha in (("u8", 0.8), ("u4", 0.5)):
        qp = new.qparams[prof]
        np.testing.assert_array_equal(qp.smoothing["blk.q"], smoothing_factors(pooled, w, alpha))
        expect = smoothed_weight_point(w, qp.smoothing["blk.q"], qp.points["blk.q:weight"].spec)
        np.testing.assert_array_equal(qp.points["blk.q:weight"].scale, expect.scale)
    assert KEYS[0] not in new.qparams["u8"].points and new.qparams["u8"].meta == per_token
    # a Linear only one group quantizes is still asked for (the intersection would drop it)
    only_u8 = dict(initial, u4=QParams({k: v for k, v in initial["u4"].points.items() if k != KEYS[0]}, "fp-test", 0))
    assert absmax_request(only_u8, cfg, weights) == {"blk.q:input": 8}
    assert smoothable_paths(only_u8, cfg, weights) == []
    # ``smoothing.skip``: a profile leaves the Linears it names unsmoothed, the others still smooth them
    skip = config(smoothing={"alpha": 0.8, "profiles": {"u4": 0.5}, "skip_profiles": ["s16"],
                             "skip": {"u4": ["blk.*"]}}, schedule=[{"job": "scout"}])
    assert smoothable_paths({"u4": initial["u4"]}, skip, weights) == []
    assert absmax_request(initial, skip, weights) == {"blk.q:input": 8}
    new, m = apply_round(state, 1, skip.schedule[0], replies, [], skip, weights)
    assert m["smoothed"] == {"u8": 1, "u4": 0}
    assert np.all(new.qparams["u4"].smoothing["blk.q"] == 1)
    assert new.qparams["u4"].points["blk.q:weight"] is state.qparams["u4"].points["blk.q:weight"]
    typo = config(smoothing={"alpha": 0.8, "skip": {"u4": ["*.nope"]}}, schedule=[{"job": "scout"}])
    with pytest.raises(ValueError, match=r"smoothing.skip.u4: '\*.nope' matches no Linear"):
        instructions_for(state, 1, typo.schedule[0], typo, weights)
    for bad, says in (({"skip": {"u4": ["blk.q:input"]}}, "not point keys"),
                      ({"skip": {"s16": ["blk.q"]}, "skip_profiles": ["s16"]}, "skipped whole and by Linear")):
        with pytest.raises(ValueError, match=says):
            config(smoothing={"alpha": 0.8, **bad})


def test_smoothing_needs_exactly_one_scouting_round():
    with pytest.raises(ValueError, match="one scouting round"):
        config(smoothing={}, schedule=[{"job": "scout", "repeat": 2}, {"job": "stats"}])
    with pytest.raises(ValueError, match="no scout round"):
        config(smoothing={}, schedule=[{"job": "lsq"}])
    with pytest.raises(ValueError, match="min_factor"):
        config(smoothing={"min_factor": 2.0, "max_factor": 1.0})
    with pytest.raises(ValueError, match="both"):
        config(smoothing={"profiles": {"u4": 0.5}, "skip_profiles": ["u4"]})


def test_a_profile_can_have_its_own_calibrator():
    """``profile_calibrators``: the statistics round calibrates u8 with min-max, the rest with MSE,
    from the same sums."""
    from server.aggregate import ranges_for_profile
    from quant.calibrate import CalibratorConfig

    cfg = config(profile_calibrators={"u8": {"method": "minmax"}})
    data = client_data(6)
    state = after_scout(cfg, data)
    spec = cfg.schedule[1]
    inss = instructions_for(state, 2, spec, cfg)
    new, _ = apply_round(state, 2, spec, stats_replies(data, sorted(data), inss), [], cfg)
    for prof, method in (("u8", "minmax"), ("u4", "mse")):
        qp = state.qparams[prof]
        ref = ranges_for_profile(new.sums, {k: qp.points[k].spec for k in activation_keys(qp)},
                                 CalibratorConfig(method=method))
        for k, p in ref.items():
            np.testing.assert_array_equal(new.qparams[prof].points[k].scale, p.scale)
    assert not np.array_equal(new.qparams["u8"].points[KEYS[0]].scale,
                              ranges_for_profile(new.sums, {KEYS[0]: PROFILES["u8"]}, CalibratorConfig())[KEYS[0]].scale)


def test_a_round_with_two_replies_one_poisoned_stretches_no_range_past_the_round_factor():
    """With two replies nothing can be trimmed: the poisoned one (values at +-1e4, every point)
    still moves a range and widens a grid by at most round_factor per round under the robust
    rules; under the exact ones it sets the range (the attack of tests/test_faults.py)."""
    data = client_data(4)
    poisoned = {k: np.concatenate([v.ravel()[:-2], [-1e4, 1e4]]).astype(np.float32) for k, v in data["c01"].items()}
    out = {}
    for name, rules in (("robust", {}), ("exact", EXACT)):
        cfg = config(calibrator={"method": "minmax"}, **rules)
        state = after_scout(cfg, data)
        spec = cfg.schedule[1]
        inss = instructions_for(state, 2, spec, cfg)
        replies = stats_replies({**data, "c01": poisoned}, ["c00", "c01"], inss)
        new, m = apply_round(state, 2, spec, replies, [], cfg)
        assert m["applied"], m
        out[name] = (state, new)
    state, new = out["robust"]
    for k in KEYS:
        g0, g1 = state.grids[k], new.grids[k]
        assert g1.hi - g1.lo <= 4 * 2 * (g0.hi - g0.lo)           # widened by round_factor (snapped up)
        assert new.sums[k].max <= 4 * max(-g0.lo, g0.hi)
        for prof, qp in new.qparams.items():
            assert float(qp.points[k].scale) * (qp.points[k].spec.qmax - qp.points[k].spec.qmin) <= 2 * 4 * max(-g0.lo, g0.hi) * 1.01
    state, new = out["exact"]
    assert new.sums[KEYS[0]].max == 1e4 and new.grids[KEYS[0]].hi >= 1e4


def test_a_robust_lsq_round_moves_no_scale_more_than_the_round_factor_even_from_one_reply():
    state = initial_state(make_initial(), "d")
    k = KEYS[1]
    ls0 = math.log(float(state.qparams["u8"].points[k].scale))
    for rule, bound in (("median", math.log(4)), ("trimmed", math.log(4)), ("mean", None)):
        cfg = config(lsq_rule=rule, server_lr=1.0)
        new, _ = apply_round(state, 1, RoundSpec(job="lsq"), _lsq_replies({"u8": [math.log(8) * 0.99]}), [], cfg)
        moved = new.learned["u8"][f"log_s/{k}"] - ls0
        assert moved == pytest.approx(bound if bound else math.log(8) * 0.99, abs=1e-6), rule


def test_a_rotated_input_keeps_its_statistics_apart_from_the_unrotated_one():
    """``server.rounds.stat_key``: a rotated input's histogram is of ``(x / m) R``, so it is kept
    under ``@r<block>`` after the smoothing strength (or alone when unsmoothed), never summed with
    another profile's unrotated statistics of the same point; weights and unrotated inputs keep
    their keys."""
    import json

    from server.rounds import stat_key

    act = activation_spec(8)
    pts = {k: PointParams(act, np.float32(0.1), np.uint8(128)) for k in ("a:input", "b:input")}
    meta = {"rotated": json.dumps(["a"]), "per_token_rotation": "128"}
    rotated = QParams(dict(pts), smoothing={"a": np.ones(4, np.float32)}, meta=meta)
    plain = QParams(dict(pts), smoothing={"a": np.ones(4, np.float32)})
    cfg = ServerConfig(schedule=[{"job": "scout"}], smoothing={"alpha": 0.5})
    assert stat_key("p", rotated, "a:input", cfg) == "a:input@0.5@r128"
    assert stat_key("p", plain, "a:input", cfg) == "a:input@0.5"
    assert stat_key("p", rotated, "b:input", cfg) == "b:input"
    assert stat_key("p", rotated, "a:weight", cfg) == "a:weight"
    unsmoothed = ServerConfig(schedule=[{"job": "scout"}])
    assert stat_key("p", rotated, "a:input", unsmoothed) == "a:input@r128"
    with pytest.raises(ValueError, match="rotation block"):
        QParams(dict(pts), meta={"rotated": json.dumps(["a"])}).validate()

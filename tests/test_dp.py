"""Differentially private ranges (quant/dp.py) and their accountant (server/privacy.py)."""

import math

import numpy as np
import pytest

from quant import dp

CENTRES = {"a:input": (-2.0, 8.0), "b:input": (0.0, 4.0), "c:input": (-1.0, 1.0)}


def test_client_vector_is_log2_of_the_width_and_the_shift_of_zeros_place():
    v = dp.client_vector({"a:input": (-4.0, 16.0), "b:input": (-4.0, 12.0)}, CENTRES, clip=100)
    # sorted keys, (log2 width ratio, zero's place - the centre's) each: a: 20 vs 10 wide, zero at 0.2 in
    # both; b: 16 vs 4, 0.25 vs 0 (the centre is one-sided); c: no range from this client -> 0
    assert v.tolist() == pytest.approx([1.0, 0.0, 2.0, 0.25, 0.0, 0.0])


def test_client_vector_is_clipped_in_l2_keeping_its_direction():
    ranges = {"a:input": (-64.0, 256.0), "b:input": (0.0, 0.5)}
    raw = dp.client_vector(ranges, CENTRES, clip=100)
    v = dp.client_vector(ranges, CENTRES, clip=1.5)
    assert raw.tolist() == pytest.approx([5.0, 0.0, -3.0, 0.0, 0.0, 0.0])
    assert np.linalg.norm(v) == pytest.approx(1.5)
    assert v / np.linalg.norm(v) == pytest.approx(raw / np.linalg.norm(raw))


def test_a_client_range_of_zeros_is_bounded_not_infinite():
    v = dp.client_vector({"a:input": (0.0, 0.0)}, CENTRES, clip=100)
    assert v.tolist() == pytest.approx([-dp.SPAN, -0.2, 0.0, 0.0, 0.0, 0.0])


def test_client_vector_refuses_keys_the_release_does_not_have():
    with pytest.raises(ValueError, match="do not have"):
        dp.client_vector({"z:input": (-1.0, 1.0)}, CENTRES, clip=1)
    with pytest.raises(ValueError, match="clip"):
        dp.client_vector({}, CENTRES, clip=0)


def test_release_without_noise_is_the_geometric_mean_width_and_mean_place():
    rng = np.random.default_rng(0)
    clients = [{"a:input": (-f * w, (1 - f) * w), "c:input": (-1.0, 1.0)}
               for w, f in ((5.0, 0.1), (20.0, 0.2), (80.0, 0.3))]
    total = dp.noisy_sum([dp.client_vector(c, CENTRES, clip=10) for c in clients], 0.0, rng)
    out = dp.release(total, len(clients), CENTRES)
    assert out["a:input"] == pytest.approx((-4.0, 16.0))     # width 20, zero at 0.2
    assert out["b:input"] == pytest.approx((0.0, 4.0))       # nobody reported it: the centre
    assert out["c:input"] == pytest.approx((-1.0, 1.0))


def test_noise_has_the_mechanisms_standard_deviation_and_shares_add_up_to_it():
    rng = np.random.default_rng(1)
    z, clip, t = 0.8, 3.0, 16
    std = dp.noise_std(z, clip)
    assert std == pytest.approx(z * 2 * clip)                 # replace-one sensitivity 2 clip
    draws = np.stack([dp.noisy_sum([np.zeros(6)], std, rng) for _ in range(4000)])
    assert draws.std() == pytest.approx(std, rel=0.03)
    shares = np.stack([sum(rng.normal(0, dp.noise_share_std(z, clip, t), 6) for _ in range(t))
                       for _ in range(2000)])
    assert shares.std() == pytest.approx(std, rel=0.04)


def test_release_refuses_a_sum_of_the_wrong_shape_or_not_finite():
    with pytest.raises(ValueError, match="centres need 6"):
        dp.release(np.zeros(4), 3, CENTRES)
    with pytest.raises(ValueError, match="non-finite"):
        dp.release(np.array([0, 0, np.nan, 0, 0, 0.0]), 3, CENTRES)
    with pytest.raises(ValueError, match="clients"):
        dp.release(np.zeros(6), 0, CENTRES)


def test_release_divides_each_key_by_the_clients_that_could_report_it():
    total = np.array([2.0, 0.2, 3.0, 0.0, 5.0, 5.0])    # a: 2 clients, b: 3 clients, c: none
    out = dp.release(total, np.array([2, 3, 0]), CENTRES)
    assert out["a:input"] == pytest.approx((-6.0, 14.0))     # width 20, zero at 0.3
    assert out["b:input"] == pytest.approx((0.0, 8.0))
    assert out["c:input"] == pytest.approx((-1.0, 1.0))


def test_one_client_moves_the_release_by_at_most_its_clip():
    """What DP rests on: replacing one client's range, however wild, moves the sum by <= 2 clip."""
    honest = [{"a:input": (-4.0, 16.0), "c:input": (-2.0, 2.0)}] * 5
    wild = {"a:input": (-1e-30, 1e-30), "c:input": (-1e-30, 1e-30)}
    clip = 2.0
    a = sum(dp.client_vector(c, CENTRES, clip) for c in honest)
    b = sum(dp.client_vector(c, CENTRES, clip) for c in honest[:-1] + [wild])
    assert np.linalg.norm(a - b) <= 2 * clip + 1e-9
    assert np.linalg.norm(a - b) > clip                        # and the bound is not vacuous here


# ---------------------------------------------------------------------------------------------
# The accountant: Flower's RdpAccountant over dp-accounting

def test_epsilon_of_the_full_gaussian_is_within_the_classical_rdp_bound():
    privacy = pytest.importorskip("server.privacy")
    z, delta = 2.0, 1e-5
    eps = privacy.epsilon(z, [10], 10, delta)          # everyone sampled: no amplification
    # Renyi DP of the Gaussian mechanism: alpha / (2 z^2); converted: + log(1/delta) / (alpha - 1)
    classic = min(a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    assert 0.7 * classic <= eps <= classic + 1e-6


def test_epsilon_falls_with_noise_and_sampling_and_rises_with_rounds():
    privacy = pytest.importorskip("server.privacy")
    e = privacy.epsilon(1.0, [12, 12], 24, 1e-5)
    assert privacy.epsilon(2.0, [12, 12], 24, 1e-5) < e
    assert privacy.epsilon(1.0, [12, 12, 12], 24, 1e-5) > e
    assert privacy.epsilon(1.0, [6, 6], 24, 1e-5) < e
    assert privacy.epsilon(1.0, [], 24, 1e-5) == 0.0


def test_noise_multiplier_for_meets_the_target_and_is_the_smallest_that_does():
    privacy = pytest.importorskip("server.privacy")
    z = privacy.noise_multiplier_for(8.0, [12, 12], 24, 1e-5, tolerance=1e-3)
    assert privacy.epsilon(z, [12, 12], 24, 1e-5) <= 8.0
    assert privacy.epsilon(z / 1.01, [12, 12], 24, 1e-5) > 8.0
    with pytest.raises(ValueError, match="epsilon"):
        privacy.noise_multiplier_for(0.0, [12], 24, 1e-5)


# ---------------------------------------------------------------------------------------------
# The server's DP statistics rounds (server/rounds.py) with the client's own job (client/jobs.py)

def _dp_round_setup(monkeypatch, z):
    from server import config as server_config
    from tests.test_rounds import EXACT, after_scout, client_data, config

    monkeypatch.setattr(server_config, "_noise_multiplier", lambda eps, delta: z)
    cfg = config(**{**EXACT, "absmax_rule": "max"}, dp={"epsilon": 4.0, "clips": [20.0, 6.0]})
    data = client_data(10)
    return cfg, data, after_scout(cfg, data)


def _dp_replies(cfg, data, sampled, inss, rnd):
    from client.jobs import dp_vector
    from quant.stats import observe
    from quant.wire import StatsReply
    from server.rounds import Accepted
    from tests.test_rounds import profile_of

    out, own = {}, {}
    for c in sampled:
        p = profile_of(c)
        ins = inss[p]
        reply = StatsReply({k: observe(data[c][k], ins.grids[k]) for k in ins.keys})
        v = dp_vector(reply, ins, cfg.calibrator_for(p), cfg.dp_clip(rnd))
        out.setdefault(p, []).append(Accepted(c, 12, v))
        own.setdefault(p, []).append(reply)
    return out, own


def test_dp_rounds_release_the_geometric_mean_of_the_clients_own_ranges_without_noise(monkeypatch):
    """The noise-free limit: each end released is the geometric mean of the round's clients' own
    calibrated ends (the starting ranges cancel), every client used once, no histogram kept."""
    from quant.affine import qparams_to_range
    from quant.calibrate import calibrate
    from server.rounds import apply_round, instructions_for, sample_clients

    cfg, data, state = _dp_round_setup(monkeypatch, 1e-12)
    spec = cfg.schedule[1]
    for rnd in (2, 3, 4):
        sampled = sample_clients(sorted(data), state.used, spec.fraction, spec.min_clients, cfg.seed, rnd)
        inss = instructions_for(state, rnd, spec, cfg)
        replies, own = _dp_replies(cfg, data, sampled, inss, rnd)
        state, m = apply_round(state, rnd, spec, replies, [], cfg)
        assert m["applied"], m
        assert {p: r["clients"] for p, r in m["dp"].items()} == {p: len(v) for p, v in replies.items()}
        assert all(r["clip"] == (20.0 if rnd == 2 else 6.0) for r in m["dp"].values())
        for p, replies_p in own.items():
            qp = state.qparams[p]
            for k in inss[p].keys:
                spec_k = qp.points[k].spec
                w, f = np.array([dp.coordinates({k: calibrate(r.stats[k], spec_k, cfg.calibrator_for(p))})
                                 for r in replies_p])[:, :, 0].T
                lo, hi = (float(x) for x in qparams_to_range(qp.points[k].scale, qp.points[k].zero_point, spec_k))
                held = inss[p].qparams.points[k]
                cw, _ = dp.coordinates({k: qparams_to_range(held.scale, held.zero_point, spec_k)})
                # a round moves a width by at most 2^SPAN (the client clamps, so does the release)
                width = cw[0] * np.exp2(np.mean(np.clip(np.log2(w / cw[0]), -dp.SPAN, dp.SPAN)))
                place = np.mean(f)
                if spec_k.symmetric:        # range_to_qparams centres zero: the larger side decides
                    assert hi == pytest.approx(width * max(place, 1 - place), rel=1e-4), (rnd, p, k)
                    continue
                # the released width is exact; rounding the zero point moves zero's place by <= a step
                assert hi - lo == pytest.approx(width, rel=1e-4), (rnd, p, k)
                assert abs(-lo / (hi - lo) - place) <= 1.001 / (spec_k.qmax - spec_k.qmin), (rnd, p, k)
    assert sorted(state.used) == sorted(data) and not state.sums


def test_dp_rounds_add_the_noise_the_config_says(monkeypatch):
    """With noise: the same round released with z = 0.5 moves the ends off the noise-free release
    by an amount of the noise's size (z 2 clip / clients per coordinate, in octaves)."""
    from server.rounds import apply_round, instructions_for, sample_clients

    moved = []
    for z in (1e-12, 0.5):
        cfg, data, state = _dp_round_setup(monkeypatch, z)
        spec = cfg.schedule[1]
        sampled = sample_clients(sorted(data), state.used, spec.fraction, spec.min_clients, cfg.seed, 2)
        inss = instructions_for(state, 2, spec, cfg)
        replies, _ = _dp_replies(cfg, data, sampled, inss, 2)
        new, m = apply_round(state, 2, spec, replies, [], cfg)
        assert m["dp"]["u8"]["noise_std"] == pytest.approx(max(z, 1e-12) * 2 * 20.0)
        qp = new.qparams["u8"]
        moved.append(np.array([float(qp.points[k].scale) for k in inss["u8"].keys]))    # width / 255
    clients = len(replies["u8"])
    octaves = np.abs(np.log2(moved[1] / moved[0]))
    sigma = 0.5 * 2 * 20.0 / clients
    assert np.all(octaves > 0) and np.all(octaves < 6 * sigma), (octaves, sigma)


def test_dp_config_is_checked_and_kept_out_of_the_preparation():
    from pydantic import ValidationError

    from server.config import ServerConfig
    from simulation.prepare import config_digest, load_simulation_config
    from tests.test_rounds import config
    from tests.test_simulate import SMOKE

    with pytest.raises(ValidationError, match="stats_rule"):
        config(dp={"epsilon": 8.0})                               # the default trimmed rule
    with pytest.raises(ValidationError, match="clips"):
        config(stats_rule="sum", dp={"epsilon": 8.0, "clips": [4.0, float("nan")]})
    with pytest.raises(ValidationError, match="epsilon"):
        config(stats_rule="sum", dp={"epsilon": 0})
    cfg = config(stats_rule="sum", dp={"epsilon": 8.0, "clips": [9.0, 3.0]})
    assert [cfg.dp_clip(r) for r in (2, 3, 4)] == [9.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="not a statistics round"):
        cfg.dp_clip(1)
    assert cfg.digest() != config(stats_rule="sum").digest()
    assert isinstance(cfg, ServerConfig)
    plain = load_simulation_config(SMOKE)
    private = plain.model_copy(update={"server": plain.server.model_copy(
        update={"stats_rule": "sum", "dp": cfg.dp})})
    assert config_digest(plain) == config_digest(private)


def test_a_dp_reply_round_trips_and_bad_ones_are_refused_with_a_code():
    from quant.wire import encode_dp_reply
    from server.validate import Rejection, validate_dp_reply
    from tests.test_secure import instruction

    ins = instruction()
    v = np.array([0.5, -1.0, 0.0, 2.0, 0.25, 0.0])
    flat, header = encode_dp_reply(v, ins)
    assert np.array_equal(validate_dp_reply(flat, header, ins, 3, clip=2.5), v)
    over = validate_dp_reply(flat, header, ins, 3, clip=2.0)
    assert isinstance(over, Rejection) and over.code == "dp_clip"
    bad = dict(flat)
    bad[next(iter(bad))] = np.full_like(next(iter(flat.values())), np.nan)
    assert validate_dp_reply(bad, header, ins, 3, clip=10).code in ("nan", "malformed")
    assert validate_dp_reply(flat, header, ins, 0, clip=10).code == "examples"
    with pytest.raises(ValueError, match="keys need"):
        encode_dp_reply(v[:4], ins)


def test_a_dp_run_on_flowers_simulation_engine_reports_its_epsilon(tmp_path):
    """The smoke run with DP statistics rounds, end to end through Flower: clients reply with
    clipped range vectors (no histograms reach the server), both profiles' ranges move in both
    statistics rounds, and summary.json and the run's table report the epsilon spent and what it
    does not cover."""
    import json

    from server.privacy import epsilon
    from server.state import load_checkpoint
    from tests.test_simulate import SMOKE, simulate

    text = SMOKE.read_text().replace("[server]\n", '[server]\nstats_rule = "sum"\n'
                                     'dp = { epsilon = 8.0, clips = [12.0, 3.0] }\n', 1)
    config = tmp_path / "dp.toml"
    config.write_text(text)
    out = tmp_path / "run"
    proc = simulate(out, "--rounds", "4", config=config)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stats = [m for m in lines if m["job"] == "stats"]
    assert len(stats) == 2 and all(m["applied"] for m in stats), stats
    for m, clip in zip(stats, (12.0, 3.0)):
        assert set(m["dp"]) == {"int8", "int16"} and set(m["changed"]) == {"int8", "int16"}, m
        for r in m["dp"].values():
            assert r["clients"] >= 1 and r["clip"] == clip and r["noise_std"] > 0
        assert all(b["up_per_client"] <= 16 * 1024 for b in m["bytes"].values()), m["bytes"]
    state = load_checkpoint(out / "checkpoint.safetensors")
    assert not state.sums and state.round == 4
    privacy = json.loads((out / "summary.json").read_text())["privacy"]["dp"]
    assert privacy["released_in_rounds"] == [m["round"] for m in stats]
    assert privacy["epsilon"] <= 8.0 and privacy["epsilon"] == pytest.approx(
        epsilon(privacy["noise_multiplier"], [1], 1, 1e-5))
    assert any("scouting" in x for x in privacy["not_covered"])
    assert "-DP" in proc.stdout and "not covered" in proc.stdout


# ---------------------------------------------------------------------------------------------
# DP under secure aggregation: the clients add the noise in shares

def test_noise_shares_fit_secaggs_range_and_add_up_to_the_mechanisms_noise():
    rng = np.random.default_rng(3)
    clip, share, t = 2.0, 0.4, 9
    v = dp.clip_l2(rng.normal(size=50) * 10, clip)
    bound = dp.secure_bound(clip, share)
    sent = [dp.noised_secure_vector(v, share, clip, rng) for _ in range(t)]
    assert all(np.all(np.abs(x) <= 1.0) for x in sent)
    total = np.sum(sent, axis=0) * bound - t * v                 # what the shares add to the sum
    assert total.std() == pytest.approx(share * math.sqrt(t), rel=0.25)
    assert np.all(np.abs(np.mean(sent, axis=0) * bound - v) < 6 * share)


def test_secure_noise_shares_are_sized_for_the_fewest_vectors_that_can_unmask():
    from server.privacy import secure_noise_share
    from tests.test_rounds import config

    cfg = config(stats_rule="sum", dp={"epsilon": 4.0, "clips": [5.0]}, secure={"reconstruction_threshold": 0.6})
    share, t = secure_noise_share(cfg, 2, 10)
    assert t == 6
    z = cfg.dp.noise_multiplier()
    assert share * math.sqrt(t) == pytest.approx(dp.noise_std(z, 5.0))


def test_a_dp_run_under_secagg_with_devices_dropping_out(tmp_path):
    """DP and SecAgg+ together on Flower's simulation engine, a quarter of the devices dropping out
    in the middle of the protocol: every statistics round releases (or is refused for too few
    vectors, never half-applied), the noise is the clients' shares, and summary.json says the
    server saw the noisy sum only."""
    import json

    from server.state import load_checkpoint
    from tests.test_secure import _config
    from tests.test_simulate import simulate

    path = _config(tmp_path, secure=True)
    dp_line = "dp = { epsilon = 8.0, clips = [12.0, 3.0] }\n"
    path.write_text(path.read_text().replace("secure = { cap = 1048576 }\n", "secure = { cap = 1048576 }\n" + dp_line))
    out = tmp_path / "run"
    simulate(out, "--rounds", "3", config=path)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stats = [m for m in lines if m["job"] == "stats"]
    applied = [m for m in stats if m["applied"]]
    assert applied, stats
    assert sum(m["rejections"].get("secure_dropout", 0) for m in stats) >= 1, \
        "the seeded draw lost no device mid-protocol: change the dropout rate"
    for m in applied:
        assert m["dp"]["int8"]["noise"] == "the clients' shares" and m["dp"]["int8"]["clients"] >= 2
        assert m["secure"]["int8"]["summed"] == m["dp"]["int8"]["clients"]
    before = next(m for m in lines if m["job"] == "scout")["versions"]["int8"]
    assert stats[-1]["versions"]["int8"] == before + len(applied)     # each release is a new version
    state = load_checkpoint(out / "checkpoint.safetensors")
    assert not state.sums
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert "noisy sum only" in privacy["statistics"] and privacy["dp"]["released_in_rounds"] == \
        [m["round"] for m in applied]


def test_the_dp_bench_cache_round_trips_without_pickle(tmp_path):
    from bench.dp_quality import load_cache, save_cache
    from tests.test_rounds import KEYS, make_initial

    initial = make_initial()
    ranges = {p: (qp, {k: qp.points[k].spec for k in KEYS[:2]},
                  {0: {KEYS[0]: (-1.5, 2.25)}, 3: {KEYS[0]: (0.0, 4.0), KEYS[1]: (-0.125, 8.0)}})
              for p, qp in initial.items()}
    save_cache(tmp_path / "c", ranges, dict(initial))
    got, pooled = load_cache(tmp_path / "c")
    assert set(got) == set(ranges) and set(pooled) == set(initial)
    for p, (qp, specs, own) in ranges.items():
        gqp, gspecs, gown = got[p]
        assert gspecs == specs and gown == own
        assert all(np.array_equal(gqp.points[k].scale, qp.points[k].scale) for k in qp.points)
        assert all(np.array_equal(pooled[p].points[k].zero_point, qp.points[k].zero_point) for k in qp.points)
    assert not list((tmp_path / "c").glob("*.pkl"))

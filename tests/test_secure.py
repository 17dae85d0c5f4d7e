"""Secure aggregation of the statistics rounds (SecAgg+, docs/privacy.md): the vector layout, the
server's checks of a sum, the config, and a run on Flower's real simulation engine whose secure sums
equal the plaintext sums of the same clients, with devices dropping out in the middle of the
protocol."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.test_wire import qparams
from quant.stats import grid_from_absmax, merge_all, observe
from quant.wire import (Instruction, StatsReply, secure_stats_length, secure_vector_to_stats,
                        stats_to_secure_vector)
from server.config import SecureConfig, ServerConfig
from server.secure import secure_tolerance
from server.state import load_checkpoint
from tests.test_simulate import SMOKE, simulate

RNG = np.random.default_rng(0)
KEYS = ["m.l0.q:input", "m.l0.d:input", "m.l0.o:input"]


def instruction(bins=32):
    grids = {k: grid_from_absmax([2.0 + i], bins) for i, k in enumerate(KEYS)}
    return Instruction(3, "stats", qparams(), grids=grids)


def reply(ins, size=(40, 8), scale=1.0):
    return StatsReply({k: observe(RNG.normal(size=size).astype(np.float32) * scale * (1 + i), ins.grids[k])
                       for i, k in enumerate(ins.keys)})


def test_vectors_sum_to_the_pooled_statistics():
    ins = instruction()
    replies = [reply(ins, scale=s) for s in (0.5, 1.0, 3.0)]      # 3.0: mass outside the grids
    cap = 1 << 20
    vecs = [stats_to_secure_vector(r, ins, cap) for r in replies]
    assert all(v.shape == (secure_stats_length(ins),) and v.min() >= 0 and v.max() <= 1 for v in vecs)
    pooled = {k: merge_all([r.stats[k] for r in replies]) for k in KEYS}
    got = secure_vector_to_stats(np.sum(vecs, axis=0), ins, cap, 3, tolerance=1e-12)
    for k in KEYS:
        g, p = got[k], pooled[k]
        assert np.array_equal(g.counts, p.counts) and (g.below, g.above, g.n) == (p.below, p.above, p.n), k
        # no client sent min/max: the occupied cells bound them, on the same side of the grid
        assert (g.min < g.lo) == (p.min < p.lo) and (g.max >= g.hi) == (p.max >= p.hi), k
        assert g.min <= p.min or p.min < p.lo
    assert got[KEYS[2]].above > 0 and got[KEYS[2]].below > 0


def test_a_point_over_the_cap_is_scaled_to_it_and_the_shape_kept():
    ins = instruction()
    r = reply(ins, size=(100, 8))
    v = stats_to_secure_vector(r, ins, cap=200)                    # 800 values per point > 200
    back = secure_vector_to_stats(v, ins, 200, 1, tolerance=1e-12)
    for k in KEYS:
        assert back[k].n == pytest.approx(200, abs=len(r.stats[k].counts) + 2)
        share = r.stats[k].counts / r.stats[k].n
        assert np.allclose(back[k].counts / back[k].n, share, atol=0.01)


def test_sums_no_honest_clients_give_are_refused():
    ins = instruction()
    v = stats_to_secure_vector(reply(ins), ins, 1 << 20)
    n = secure_stats_length(ins)
    for bad, words in ((np.zeros(n + 1), "numbers"), (np.full(n, np.nan), "not finite"),
                       (v + 1.5, "clients give"), (np.where(np.arange(n) == 3, v + 0.5, v), "add up")):
        with pytest.raises(ValueError, match=words):
            secure_vector_to_stats(bad, ins, 1 << 20, 1, tolerance=1e-6)


def test_secure_config_needs_sums_and_a_modulus_that_holds_the_sum():
    sched = [{"job": "scout"}, {"job": "stats"}]
    with pytest.raises(ValueError, match="stats_rule = 'sum'"):
        ServerConfig(schedule=sched, secure=SecureConfig())
    ok = ServerConfig(schedule=sched, stats_rule="sum", secure=SecureConfig())
    assert ok.secure.max_clients() >= 100_000
    assert ok.digest() != ServerConfig(schedule=sched, stats_rule="sum").digest()
    with pytest.raises(ValueError, match="power of 2"):
        SecureConfig(modulus_range=(1 << 40) + 1)
    with pytest.raises(ValueError, match="exceed"):
        SecureConfig(modulus_range=1 << 30, quantization_range=1 << 30)
    # each client's count is off by less than 2 cap / quantization_range (1/32 with the defaults):
    # the rounded sum of up to 16 clients is exact, and the tolerance covers that error twice
    d = SecureConfig()
    assert 16 * 2 * d.cap / d.quantization_range <= 1.0
    assert secure_tolerance(d, 16) == 2 * 16 * 2 / d.quantization_range


def _config(tmp_path, secure: bool | str):
    """The smoke run with 9 int8 clients, 3 per statistics round, 1 in 4 devices dropping out of a
    job (the draw is seeded: both runs lose the same devices in the same rounds). ``secure``: a
    string is more of the secure table (", scout = false")."""
    more = secure if isinstance(secure, str) else ""
    text = SMOKE.read_text()
    text = text.replace("clients = 6", "clients = 9")
    text = text.replace('[[fleet]]\nprofile = "int8"\nshare = 2\n', '[[fleet]]\nprofile = "int8"\nshare = 2\ndropout = 0.25\n')
    text = text.replace('[[fleet]]\nprofile = "int16"\nshare = 1\n', "")
    text = text.replace("min_available = 6", "min_available = 9")
    head = '[server]\nstats_rule = "sum"\nabsmax_rule = "max"\n'
    text = text.replace("[server]\n", head + (f"secure = {{ cap = 1048576{more} }}\n" if secure is not False else ""), 1)
    text = text.replace('job = "stats"\nrepeat = 2\nfraction = 0.5', 'job = "stats"\nrepeat = 2\nfraction = 0.34')
    path = tmp_path / (f"secure{len(more)}.toml" if secure is not False else "plain.toml")
    path.write_text(text)
    return path


def test_secure_sums_equal_the_plaintext_sums_with_devices_dropping_out(tmp_path):
    """Two runs of scout + 2 statistics rounds: SecAgg+ and plaintext sums. The same clients are
    sampled and the same ones drop out (in the secure run in the middle of the protocol, after the
    keys were shared: their masks are removed with their neighbours' shares); the statistics the
    server keeps are the same counts, point by point."""
    runs = {}
    for secure in (False, True):    # scouting in the clear in both: the same grids (test_private_scout)
        out = tmp_path / ("secure" if secure else "plain")
        simulate(out, "--rounds", "3", config=_config(tmp_path, ", scout = false" if secure else False))
        runs[secure] = (load_checkpoint(out / "checkpoint.safetensors"),
                        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    (plain, pm), (sec, sm) = runs[False], runs[True]
    stats_rounds = [m for m in sm if m["job"] == "stats"]
    assert all(m["secure"]["int8"]["summed"] >= 2 for m in stats_rounds), stats_rounds
    for m in stats_rounds:      # setup, key shares, masked vectors, unmasking; the server's work besides
        info = m["secure"]["int8"]
        assert len(info["step_s"]) == 4 and 0 < sum(info["step_s"]) <= info["protocol_s"] <= m["wall_s"]
    dropped = sum(m["rejections"].get("secure_dropout", 0) for m in stats_rounds)
    assert dropped >= 1, "the seeded draw lost no device in a statistics round: change the dropout rate"
    assert dropped == sum(m["rejections"].get("client:dropout", 0) for m in pm if m["job"] == "stats")
    assert [m.get("rejected_clients") for m in stats_rounds] == \
        [{c: "secure_dropout" for c in (m.get("rejected_clients") or {})} or None
         for m in pm if m["job"] == "stats"]
    assert set(sec.sums) == set(plain.sums) and sec.sums
    for k, p in plain.sums.items():
        s = sec.sums[k]
        assert s.grid == p.grid, k
        assert np.array_equal(s.counts, p.counts) and (s.below, s.above, s.n) == (p.below, p.above, p.n), k
    assert sec.used == plain.used


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_secure_statistics_on_the_deployment_engine(tmp_path, monkeypatch):
    """The fleet runs it from the same switch: 3 SuperNodes (TLS, node authentication) of one
    profile, a private scouting round + a secure statistics round; each sums all 3 through SecAgg+
    and the statistics move the ranges."""
    from server.fleet import deployment
    from server.fleet.processes import alive
    from tests.test_fleet import FLEET_SMOKE, _all_pids

    for k, v in dict(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
                     HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
        monkeypatch.setenv(k, v)
    text = FLEET_SMOKE.read_text().replace('[[fleet]]\nprofile = "int16"\nshare = 1\n', "")
    text = text.replace("[server]\n", '[server]\nstats_rule = "sum"\nsecure = { cap = 1048576 }\n', 1)
    config = tmp_path / "fleet-secure.toml"
    config.write_text(text)
    d, out = tmp_path / "fleet", tmp_path / "run"
    pids: set[int] = set()
    try:
        deployment.up(d, config, out)
        pids.update(_all_pids(d))
        run_id = deployment.submit_run(d, config, out, out / "device")
        status = deployment.wait_run(d, run_id, timeout=900)
        assert status == "finished:completed", deployment.run_log(d, run_id)[-4000:]
        pids.update(_all_pids(d))
    finally:
        deployment.stop_fleet(d)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scout = metrics[0]              # private scouting on the fleet too (quant.private_scout)
    assert scout["job"] == "scout" and scout["applied"] and scout["secure"]["int8"]["summed"] == 3, scout
    stats = metrics[1]
    assert stats["job"] == "stats" and stats["replies"] == 3 and stats["rejections"] == {}, stats
    assert stats["secure"]["int8"]["summed"] == 3 and stats["applied"] and stats["versions"] == {"int8": 1}
    assert stats["secure"]["bytes"]["int8"]["up_per_client"] > 0
    sums = load_checkpoint(out / "checkpoint.safetensors").sums
    assert sums and all(s.n > 0 for s in sums.values())
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in pids if alive(p)] == []


def test_bench_configs_share_secrets_with_a_logarithmic_neighbourhood():
    """bench/secure_rounds.py: the plain and secure configs differ only in `secure`; a large fleet
    shares each client's secrets with about 33 neighbours, a small one with all."""
    from bench.secure_rounds import configs

    for n, shares in ((10, 1.0), (1000, 0.033)):
        _, plain, secure = configs(n)
        assert plain.stats_rule == secure.stats_rule == "sum" and plain.secure is None
        assert secure.secure.num_shares == pytest.approx(shares)
        assert plain.model_copy(update={"secure": secure.secure}) == secure
        assert n <= secure.secure.max_clients()


def test_a_secure_run_reuses_a_plain_runs_preparation():
    """`--prepared-from`: secure aggregation changes the rounds, not what preparation makes."""
    from simulation.prepare import config_digest, load_simulation_config

    plain = load_simulation_config(SMOKE)
    secure = plain.model_copy(update={"server": plain.server.model_copy(
        update={"stats_rule": "sum", "secure": SecureConfig()})})
    assert config_digest(plain) == config_digest(secure)
    assert plain.server.digest() != secure.server.digest()

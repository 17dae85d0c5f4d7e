"""Private scouting (quant.private_scout, docs/privacy.md): the two SecAgg+ passes' vectors, the
server's decoding and checks of their sums, the estimates against the plaintext rule, the config,
and a whole secure schedule on Flower's simulation engine with a device dropping out mid-protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from quant import private_scout as ps
from quant.wire import Instruction, ScoutReply
from server.aggregate import clip_scouting, grids_from_scouting, max_absmax
from server.config import SecureConfig, ServerConfig
from server.rounds import private_scouting
from server.secure import secure_tolerance
from server.state import load_checkpoint
from tests.test_secure import _config as secure_config
from tests.test_simulate import simulate
from tests.test_wire import qparams

KEYS = ["m.l0.q:input", "m.l0.d:input", "m.l0.o:input", "m.l1.q:input"]
CHANNELS = {"m.l0.q:input": 16, "m.l1.q:input": 24}
SECURE = SecureConfig()


def instruction():
    return Instruction(1, "scout", qparams(), keys=tuple(KEYS), absmax=CHANNELS)


def client(rng, i):
    """A client's report: points of all signs and sizes (one never seen by client 0, one all zero
    for client 1, one only positive), heavy-tailed channel abs-max with an outlier client."""
    ranges, n = {}, {}
    for j, k in enumerate(KEYS):
        a = float(np.exp2(rng.normal(j - 1, 1.5)))
        ranges[k] = (-a * rng.uniform(0.2, 1.0), a) if j != 2 else (a * 0.1, a)
        n[k] = 0 if (i == 0 and j == 3) else 100
        if i == 1 and j == 1:
            ranges[k] = (0.0, 0.0)
    absmax = {k: (np.exp2(rng.normal(0, 1, c)) * (8.0 if i == 2 else 1.0)).astype(np.float32)
              for k, c in CHANNELS.items()}
    return ScoutReply(ranges, n, absmax)


def fixed_point(vectors, config=SECURE):
    """What SecAgg+ hands the server: each vector quantized as Flower's secaggplus_mod does (clip to
    [-1, 1], stochastic rounding to quantization_range levels), summed, dequantized."""
    q = [quantize([v], 1.0, config.quantization_range)[0].astype(np.int64) for v in vectors]
    total = np.sum(q, axis=0)
    # dequantize shifts by -1 once: undo it for a sum of len(vectors) shifted values
    return dequantize([total], 1.0, config.quantization_range)[0] + 1.0 - len(vectors)


def test_the_fixed_point_sums_equal_the_plaintext_counts_and_bound_the_max():
    rng = np.random.default_rng(3)
    ins = instruction()
    replies = [client(rng, i) for i in range(6)]
    live = [r for i, r in enumerate(replies) if i != 4]          # client 4 dropped out: not in the sum
    k = len(live)
    tol = secure_tolerance(SECURE, k)
    first = ps.decode_first_pass(fixed_point([ps.first_pass_vector(r, ins) for r in live]), ins, k, tol)
    for key in KEYS:
        seen = [r for r in live if r.n[key] > 0]
        assert first.seen[key] == len(seen) and first.negative[key] == sum(r.ranges[key][0] < 0 for r in seen)
        cells = np.zeros(ps.CELLS, np.int64)
        for r in seen:
            if r.absmax[key] > 0:
                cells[ps.log2_cell(r.absmax[key])] += 1
        assert np.array_equal(first.cells[key], cells) and first.zero[key] == sum(r.absmax[key] == 0 for r in seen)
    for key in CHANNELS:
        u = np.stack([np.log2(r.channel_absmax[key].astype(np.float64)) / ps.LOG2_BOUND for r in live])
        assert np.allclose(first.u[key], u.sum(0), atol=tol) and np.allclose(first.u2[key], (u * u).sum(0), atol=tol)
    bound = ps.bounds(first, tol)
    true = max_absmax([r.channel_absmax for r in live])
    for key in CHANNELS:          # 5 clients: Samuelson's bound is the tighter one, and never below the max
        assert np.all(bound[key] >= true[key])
    flat_b = np.concatenate([bound[key] for key in ins.absmax])
    second = ps.decode_second_pass(fixed_point([ps.second_pass_vector(r, ins, flat_b) for r in live]), ins, k, tol)
    est = ps.absmax_estimate(second, bound, tol)
    for key in CHANNELS:
        ratio = est[key].astype(np.float64) / true[key]
        assert ratio.min() >= 1 - 1e-6 and ratio.max() <= k ** (1 / ps.POWER) * (1 + 1e-6), key


def test_grids_from_the_sums_cover_the_plaintext_grids_within_a_cell():
    rng = np.random.default_rng(4)
    ins = instruction()
    replies = [client(rng, i) for i in range(9)]
    total = np.sum([ps.first_pass_vector(r, ins) for r in replies], axis=0)
    first = ps.decode_first_pass(total, ins, len(replies), 1e-9)
    config = ServerConfig(schedule=[{"job": "scout"}], absmax_rule="max")
    pseudo = private_scouting(first, max_absmax([r.channel_absmax for r in replies]), config)
    assert len(pseudo) == len(replies)
    for clipped in (False, True):
        plain, priv = (clip_scouting(replies, 4.0), clip_scouting(pseudo, 4.0)) if clipped else (replies, pseudo)
        gp, gs = grids_from_scouting(plain, 64), grids_from_scouting(priv, 64)
        assert set(gp) == set(gs) == set(KEYS)
        for key in KEYS:
            # the quantile of the cells' upper edges is the upper edge of the quantile's cell:
            # never below the plaintext value, at most 2^(1/8) above (and the grids' snapping)
            assert (gs[key].lo == 0) == (gp[key].lo == 0), key
            assert gs[key].hi >= gp[key].hi and gs[key].hi <= gp[key].hi * 2 ** (1 / 8) * (1 + 2.0 ** -7), key
    assert grids_from_scouting(pseudo, 64)[KEYS[2]].lo == 0            # no client saw a negative value


def test_the_estimate_lies_between_the_geometric_mean_and_clipped_s_multiple_of_it():
    rng = np.random.default_rng(5)
    ins = instruction()
    replies = [client(rng, i) for i in range(5)]
    first = ps.decode_first_pass(np.sum([ps.first_pass_vector(r, ins) for r in replies], 0), ins, 5, 1e-9)
    huge = {k: np.full(c, 1e6, np.float32) for k, c in CHANNELS.items()}
    tiny = {k: np.full(c, 1e-6, np.float32) for k, c in CHANNELS.items()}   # a liar's -1 cancelled the max
    clipped = ServerConfig(schedule=[{"job": "scout"}], absmax_rule="clipped", absmax_clip=4.0)
    rep = private_scouting(first, huge, clipped)[0]
    low = private_scouting(first, tiny, clipped.model_copy(update={"absmax_rule": "max"}))[0]
    for k in CHANNELS:
        gm = np.exp2(np.mean([np.log2(r.channel_absmax[k].astype(np.float64)) for r in replies], axis=0))
        assert np.allclose(rep.channel_absmax[k], 4.0 * gm, rtol=1e-5)
        assert np.allclose(low.channel_absmax[k], gm, rtol=1e-5)           # floored at the geometric mean


def test_sums_no_honest_clients_give_are_refused():
    rng = np.random.default_rng(6)
    ins = instruction()
    replies = [client(rng, i) for i in range(3)]
    v = np.sum([ps.first_pass_vector(r, ins) for r in replies], 0)
    n, w = ps.first_pass_length(ins), ps.POINT_HEAD + ps.CELLS
    cases = [(np.zeros(n + 1), "numbers"), (np.full(n, np.nan), "not finite"),
             (np.where(np.arange(n) == 3, v + 1, v), "cells count"),               # a cell nobody fills
             (np.where(np.arange(n) == 0, v + 2, v), "clients give"),              # seen 5 of 3
             (np.where(np.arange(n) == 3 * w + 1, 1.0 + v[3 * w], v), "negative"),   # client 0 never saw point 3
             (np.where(np.arange(n) == n - 1, 0.0, v), "squared logs")]            # sum u^2 < (sum u)^2 / K
    for bad, words in cases:
        with pytest.raises(ValueError, match=words):
            ps.decode_first_pass(bad, ins, 3, 1e-6)
    with pytest.raises(ValueError, match="clients give"):
        ps.decode_second_pass(np.full(ps.second_pass_length(ins), 3.5), ins, 3, 1e-6)
    with pytest.raises(ValueError, match="bounds"):
        ps.second_pass_vector(replies[0], ins, np.zeros(ps.second_pass_length(ins)))


def test_secure_smoothing_needs_the_levels_of_the_power_sums():
    sched = [{"job": "scout"}, {"job": "stats"}]
    with pytest.raises(ValueError, match="2\\^24 levels"):
        ServerConfig(schedule=sched, stats_rule="sum", smoothing={"alpha": 0.8},
                     secure=SecureConfig(quantization_range=1 << 20, modulus_range=1 << 40))
    ServerConfig(schedule=sched, stats_rule="sum", secure=SecureConfig(quantization_range=1 << 20, modulus_range=1 << 40))


def test_a_secure_schedule_scouts_privately_end_to_end(tmp_path):
    """The smoke schedule (scout with SmoothQuant, 2 statistics rounds, eval, lsq, eval) with
    SecAgg+ and in the clear, 9 int8 clients, 1 in 4 devices dropping out (the same ones in both
    runs; in the secure run mid-protocol). The private scouting round sums the clients that stayed
    (the points' grids cover the plaintext ones within a histogram cell), its
    smoothing factors are the plaintext ones times at most K^(alpha/16), and the rest of the
    schedule runs on them."""
    runs = {}
    for secure in (False, True):             # the scouting round alone: its grids before any widening
        out = tmp_path / ("secure" if secure else "plain")
        simulate(out, "--rounds", "1", config=secure_config(tmp_path, secure))
        runs[secure] = (load_checkpoint(out / "checkpoint.safetensors"),
                        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    (plain, pm), (sec, sm) = runs[False], runs[True]
    scout = sm[0]
    assert scout["applied"] and scout["secure"]["int8"]["summed"] == scout["replies"] >= 2, scout
    assert scout["secure"]["second_pass"]["int8"]["summed"] == scout["replies"]
    lost = scout["rejections"].get("secure_dropout", 0)
    assert lost >= 1 and lost == pm[0]["rejections"].get("client:dropout", 0), (scout, pm[0])
    assert scout["replies"] == pm[0]["replies"]
    up = scout["secure"]["bytes"]["int8"]["up_per_client"]
    assert up > 0
    qs, qp = sec.qparams["int8"], plain.qparams["int8"]
    k, alpha = scout["replies"], 0.8
    assert set(qs.smoothing) == set(qp.smoothing) and qs.smoothing
    for path in qp.smoothing:
        r = qs.smoothing[path].astype(np.float64) / qp.smoothing[path]
        assert r.min() >= 1 - 1e-4 and r.max() <= k ** (alpha / ps.POWER) * (1 + 1e-4), path
    raw = [key for key in plain.grids if "@" not in key]    # the points' grids before smoothing
    assert raw and set(raw) == {key for key in sec.grids if "@" not in key}
    for key in raw:
        gs, gp = sec.grids[key], plain.grids[key]
        assert (gs.lo == 0) == (gp.lo == 0), key
        assert gp.hi <= gs.hi <= gp.hi * 2 ** (1 / 8) * (1 + 2.0 ** -7), key
    # the whole schedule on it (`--rounds 1` is another config: a run of it does not resume)
    out = tmp_path / "secure-all"
    simulate(out, config=secure_config(tmp_path, True))
    sm = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["job"] for m in sm] == ["scout", "stats", "stats", "eval", "lsq", "eval"]
    assert sm[0]["applied"] and sm[0]["replies"] == scout["replies"] and sm[0]["grids"] == scout["grids"]
    full = load_checkpoint(out / "checkpoint.safetensors")
    assert sm[1]["applied"] and sm[2]["applied"] and full.sums and full.qparams["int8"].smoothing
    assert all(math.isfinite(m["eval_all"]["perplexity"]) for m in sm if m["job"] == "eval")


def test_the_secure_configs_reuse_the_hand_plan_preparation_and_differ_in_scouting_only():
    """configs/secure.toml and configs/secure-clear-scouting.toml: the default recipe with the
    hand-written mixed plan (configs/quality/handplan.toml, whose preparation they reuse: what
    they were measured with), SecAgg+ with sums, scouting private in one only."""
    from simulation.prepare import config_digest, load_simulation_config
    from tests.test_simulate import ROOT

    base, sec, clear = (load_simulation_config(ROOT / "configs" / n)
                        for n in ("quality/handplan.toml", "secure.toml", "secure-clear-scouting.toml"))
    assert config_digest(base) == config_digest(sec) == config_digest(clear)
    assert sec.server.secure.scout and not clear.server.secure.scout and sec.server.stats_rule == "sum"
    assert sec.server.model_copy(update={"secure": clear.server.secure}) == clear.server


def test_a_phone_refuses_a_pass_it_does_not_know_and_bounds_that_do_not_fit():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from client.app import Refused, _secure_scout

    ins = instruction()
    n = ps.second_pass_length(ins)

    def content(scout_pass, bounds=None):
        rec = {"config": ConfigRecord({"secure-scout": scout_pass})}
        if bounds is not None:
            rec["scout-bounds"] = ArrayRecord({"bounds": Array(np.asarray(bounds, np.float32))})
        c = RecordDict(rec)
        return c, c["config"]

    assert _secure_scout(*content(1), ins) == (1, None)
    got = _secure_scout(*content(2, np.ones(n)), ins)
    assert got[0] == 2 and np.array_equal(got[1], np.ones(n))
    for bad in (content(3), content(2), content(2, np.ones(n - 1)), content(2, np.r_[np.ones(n - 1), np.nan]),
                content(2, np.r_[np.ones(n - 1), 0.0])):
        with pytest.raises(Refused) as e:
            _secure_scout(*bad, ins)
        assert e.value.code == "bad_instruction"

"""Validation: each bad reply is rejected with its code, and no garbage ever raises."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from quant.qparams import PointParams, QParams
from quant.spec import activation_spec, weight_spec
from quant.stats import ActivationStats, grid_from_absmax, observe
from quant.wire import (DTYPES, Instruction, Limits, LsqReply, ScoutReply, StatsReply,
                        encode_lsq_reply, encode_scout_reply, encode_stats_reply, pack)
from server.validate import (Rejection, ValidationConfig, summarise_rejections, validate_lsq_reply,
                             validate_scout_reply, validate_stats_reply)

torch.set_num_threads(1)
KEYS = ("a:input", "b:input", "c:input")
QP = QParams({"a:input": PointParams(activation_spec(8), np.float32(0.02), np.uint8(128)),
              "b:input": PointParams(activation_spec(16), np.float32(0.001), np.int16(0)),
              "c:input": PointParams(activation_spec(8, signed=True), np.float32(0.05), np.int8(-10)),
              "c:weight": PointParams(weight_spec(8), np.full(4, 0.01), np.zeros(4))}, "fp", 5)
STATS = Instruction(9, "stats", QP, grids={k: grid_from_absmax([3.0], 32) for k in KEYS}, absmax={"a:input": 4})
LSQ = Instruction(9, "lsq", QP, keys=[*KEYS, "c:weight"])
SCOUT = Instruction(9, "scout", QP, keys=KEYS)
X = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)   # 10 examples x 4 channels


def stats_payload(**kw):
    reply = StatsReply({k: observe(X * (i + 1), STATS.grids[k]) for i, k in enumerate(KEYS)},
                       {"a:input": np.abs(X).max(axis=0)})
    return encode_stats_reply(reply, STATS, **kw)


def lsq_payload(d_log_s=0.01, d_beta=0.0, loss=(2.0, 1.9)):
    shapes = {k: QP.points[k].scale.shape for k in LSQ.keys}
    reply = LsqReply({k: np.full(s, d_log_s, np.float32) for k, s in shapes.items()},
                     {k: np.full(s, d_beta, np.float32) for k, s in shapes.items()}, *loss)
    return encode_lsq_reply(reply, LSQ)


def scout_payload(ranges=None, n=40):
    ranges = ranges or {k: (-1.0, 2.0) for k in KEYS}
    return encode_scout_reply(ScoutReply(ranges, {k: n for k in KEYS}), SCOUT)


def code(result):
    return result.code if isinstance(result, Rejection) else "ok"


def with_array(flat, header, name, value):
    """Re-pack a payload with one logical array replaced (or added, or removed with None)."""
    from quant.wire import unpack
    arrays = unpack(flat, header["index"])
    if value is None:
        arrays.pop(name)
    else:
        arrays[name] = value
    flat2, index = pack(arrays)
    return flat2, {**header, "index": index}


# ---------------------------------------------------------------------------------------------
# Valid replies pass, typed

def test_valid_replies_pass_and_come_back_typed():
    r = validate_stats_reply(*stats_payload(), STATS, 10, values_per_example=(4, 4))
    assert isinstance(r, StatsReply) and all(isinstance(s, ActivationStats) for s in r.stats.values())
    assert r.stats["a:input"].n == 40
    r = validate_lsq_reply(*lsq_payload(), LSQ, 10)
    assert isinstance(r, LsqReply) and r.delta_log_s["c:weight"].shape == (4,)
    r = validate_scout_reply(*scout_payload(), SCOUT, 10)
    assert isinstance(r, ScoutReply) and r.absmax["a:input"] == 2.0
    flat, header = stats_payload()
    assert isinstance(validate_stats_reply(flat, json.dumps(header), STATS, 10), StatsReply)


# ---------------------------------------------------------------------------------------------
# Each bad case, its code

def test_stats_rejections():
    flat, h = stats_payload(count_dtype="int64")
    ok = validate_stats_reply(flat, h, STATS, 10)
    assert code(ok) == "ok"
    counts = ok.stats["a:input"].counts
    allc = np.concatenate([ok.stats[k].counts for k in KEYS])

    def bad(name, value, **kw):
        return code(validate_stats_reply(*with_array(flat, h, name, value), STATS, kw.pop("examples", 10), **kw))

    neg = allc.copy()
    neg[np.flatnonzero(counts)[0]] = -1
    assert bad("counts", neg) == "negative_count"
    more = allc.copy()
    more[0] += 1
    assert bad("counts", more) == "count_mismatch"
    assert bad("counts", allc[:-1]) == "shape"
    huge = allc.astype(np.uint64)
    huge[3] = 2**64 - 1
    assert bad("counts", huge) == "count_mismatch"
    small = allc.astype(np.int8)
    small[40] = -3                                          # bin 8 of b:input
    r = validate_stats_reply(*with_array(flat, h, "counts", small), STATS, 10)
    assert r.code == "negative_count" and "b:input" in r.detail
    assert bad("n", np.array([2**62, 80, 120])) == "count_mismatch"
    assert bad("counts", allc.astype(np.float32)) == "dtype"
    assert bad("min_max", np.array([[np.nan, 1.0]] * 3)) == "nan"
    assert bad("min_max", np.array([[5.0, 6.0]] * 3)) == "inconsistent"    # min above the filled bins
    assert bad("below_above", np.array([[-1, 0]] * 3)) == "negative_count"
    assert bad("n", np.array([40, 80, -120])) == "negative_count"
    assert bad("n", None) == "missing_key"
    assert bad("extra", np.zeros(1)) == "unknown_key"
    assert bad("absmax/a:input", np.array([1.0, np.inf, 1.0, 1.0], np.float32)) == "nan"
    assert bad("absmax/a:input", np.array([1.0, -1.0, 1.0, 1.0], np.float32)) == "absmax_range"
    assert bad("absmax/a:input", np.ones(5, np.float32)) == "shape"
    assert bad("n", np.array([40, 80, 120]), values_per_example=(1, 2)) == "count_mismatch"
    assert bad("n", np.array([40, 80, 120]), values_per_example={"b:input": (10, 20)}) == "count_mismatch"
    for examples in (0, -3, True, 1.5, "10", 10**9):
        assert bad("n", np.array([40, 80, 120]), examples=examples) == "examples"
    empty = StatsReply({k: ActivationStats(STATS.grids[k], np.zeros(32, np.int64)) for k in KEYS},
                       {"a:input": np.zeros(4, np.float32)})
    assert code(validate_stats_reply(*encode_stats_reply(empty, STATS), STATS, 10)) == "count_mismatch"
    assert code(validate_stats_reply(*encode_stats_reply(empty, STATS), STATS, 10,
                                     values_per_example=(0, 4))) == "ok"


def test_answers_to_another_round_version_or_request_are_rejected():
    flat, h = stats_payload()
    for field, value, want in [("round", 8, "stale_round"), ("version", 4, "wrong_version"),
                               ("request", "0" * 16, "wrong_request"), ("format", "x/2", "wrong_format"),
                               ("kind", "lsq", "wrong_kind"), ("round", "9", "malformed"),
                               ("round", True, "malformed"), ("extra", 1, "malformed")]:
        assert code(validate_stats_reply(flat, {**h, field: value}, STATS, 10)) == want, field
    assert code(validate_lsq_reply(flat, h, LSQ, 10)) == "wrong_kind"


def test_size_limits():
    flat, h = stats_payload()
    small = ValidationConfig(limits=Limits(max_bytes=100))
    assert code(validate_stats_reply(flat, h, STATS, 10, small)) == "too_large"
    tiny_header = ValidationConfig(limits=Limits(max_header_bytes=50))
    assert code(validate_stats_reply(flat, json.dumps(h), STATS, 10, tiny_header)) == "too_large"
    assert code(validate_stats_reply(flat, h, STATS, 10, tiny_header)) == "too_large"


def test_lsq_rejections():
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=math.log(8) * 1.01), LSQ, 10)) == "scale_range"
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=-0.5), LSQ, 10)) == "ok"      # z: 128 -> 211
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=-1.0), LSQ, 10)) == "zero_point_range"  # 348
    tight = ValidationConfig(max_log_scale_step=0.5)
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=0.6), LSQ, 10, tight)) == "scale_range"
    capped = ValidationConfig(max_scale=0.03)          # the global 0.05 of c:input is already above
    assert code(validate_lsq_reply(*lsq_payload(), LSQ, 10, capped)) == "scale_range"
    # a:input: s = 0.02, z = 128 -> beta = -2.56; moving beta by +3 puts z at -22
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=0.0, d_beta=3.0), LSQ, 10)) == "zero_point_range"
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=0.0, d_beta=0.5), LSQ, 10)) == "ok"
    assert code(validate_lsq_reply(*lsq_payload(loss=(math.nan, 1.0)), LSQ, 10)) == "nan"
    assert code(validate_lsq_reply(*lsq_payload(d_log_s=math.inf), LSQ, 10)) == "nan"
    flat, h = lsq_payload()
    assert code(validate_lsq_reply(*with_array(flat, h, "delta_beta", np.zeros(7, np.float64)), LSQ, 10)) == "dtype"
    assert code(validate_lsq_reply(*with_array(flat, h, "delta_beta", np.zeros(6, np.float32)), LSQ, 10)) == "shape"


def test_scout_rejections():
    assert code(validate_scout_reply(*scout_payload({k: (-np.inf, 1.0) for k in KEYS}), SCOUT, 10)) == "nan"
    assert code(validate_scout_reply(*scout_payload({k: (2.0, 1.0) for k in KEYS}), SCOUT, 10)) == "inconsistent"
    assert code(validate_scout_reply(*scout_payload(n=0), SCOUT, 10)) == "inconsistent"  # n = 0 with a range
    assert code(validate_scout_reply(*scout_payload(), SCOUT, 10, values_per_example=(8, 8))) == "count_mismatch"


def test_summarise_rejections():
    got = summarise_rejections([Rejection("nan"), Rejection("stale_round", "x"), Rejection("nan"), "too_large"])
    assert got == {"nan": 2, "stale_round": 1, "too_large": 1}
    assert list(got) == sorted(got)


# ---------------------------------------------------------------------------------------------
# Garbage never raises

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)
odd_dtypes = st.sampled_from([*DTYPES, "bool", "complex64", "U3", "O", ">f4", ">i8", "float16"])


@st.composite
def arrays(draw):
    dt = np.dtype(draw(odd_dtypes))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    if dt.kind == "O":
        return np.array([object()] * int(np.prod(shape)), dtype=object).reshape(shape)
    if dt.kind == "U":
        return np.full(shape, "ab", dtype=dt)
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dt.itemsize, max_size=int(np.prod(shape)) * dt.itemsize))
    return np.frombuffer(raw, dtype=dt).reshape(shape) if raw else np.zeros(shape, dt)


BASE = {"stats": stats_payload(), "lsq": lsq_payload(), "scout": scout_payload()}


@st.composite
def garbage_payloads(draw):
    """A valid payload, then random damage: header fields replaced by random JSON, index entries
    scrambled, arrays replaced by random ones of random dtypes, values overwritten; or pure junk."""
    kind = draw(st.sampled_from(["stats", "lsq", "scout"]))
    flat, header = BASE[kind]
    flat, header = dict(flat), json.loads(json.dumps(header))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["field", "entry", "array", "values"]))
        if what == "field":
            header[draw(st.sampled_from([*header, "x"]))] = draw(json_values)
        elif what == "entry" and isinstance(header.get("index"), list) and header["index"]:
            i = draw(st.integers(0, len(header["index"]) - 1))
            entry = list(header["index"][i]) if isinstance(header["index"][i], list) else [0, 0, 0, 0]
            entry[draw(st.integers(0, len(entry) - 1)) if entry else 0:] = [draw(json_values)]
            header["index"][i] = entry
        elif what == "array":
            flat[draw(st.sampled_from([*flat, *DTYPES, "junk"]))] = draw(arrays())
        elif what == "values" and flat:
            k = draw(st.sampled_from(sorted(flat)))
            a = np.array(flat[k])
            if a.size and a.dtype.kind in "iuf":
                v = draw(st.sampled_from([-1, 0, 2**7 - 1, 10**6]))
                a.flat[draw(st.integers(0, a.size - 1))] = np.array(v).astype(a.dtype)
                if a.dtype.kind == "f":
                    with np.errstate(over="ignore"):
                        a.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -0.0]))
            flat[k] = a
    if draw(st.integers(0, 9)) == 0:
        flat = draw(st.one_of(json_values, st.dictionaries(st.text(max_size=8), arrays(), max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.one_of(json_values, st.text(max_size=40), st.binary(max_size=40)))
    return kind, flat, header


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage_payloads(), st.integers(0, 4).flatmap(
    lambda i: st.just(10) if i else st.one_of(st.integers(-5, 10**7), st.floats(), st.none(), st.booleans())))
def test_validators_never_raise_on_garbage(payload, examples):
    kind, flat, header = payload
    for validate, ins, typ in ((validate_stats_reply, STATS, StatsReply), (validate_lsq_reply, LSQ, LsqReply),
                               (validate_scout_reply, SCOUT, ScoutReply)):
        r = validate(flat, header, ins, examples)
        assert isinstance(r, (Rejection, typ))
        if isinstance(r, Rejection):       # every rejection came through the documented path
            assert not r.detail.startswith("unexpected"), r.detail
        elif typ is StatsReply:
            assert all(r.stats[k].grid == STATS.grids[k] for k in KEYS)
        elif typ is LsqReply:
            assert all(np.all(np.isfinite(v)) for v in r.delta_log_s.values())


def test_unexpected_exceptions_are_reported_not_raised():
    """An exception that is not a WireError (a bug or a bizarre object) is a 'malformed' rejection
    whose detail names the exception type; the documented path raises nothing."""
    class Weird(dict):
        def items(self):
            raise RuntimeError("boom")
    r = validate_stats_reply(Weird(), {"format": "fedquant.wire/1", "kind": "stats", "round": 9,
                                       "version": 5, "request": STATS.digest, "index": []}, STATS, 10)
    assert isinstance(r, Rejection) and r.code == "malformed" and r.detail.startswith("unexpected RuntimeError")

"""The wire format: packing is exact and checked, every payload round-trips, replies stay small."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quant.qparams import PointParams, QParams
from quant.spec import activation_spec, weight_spec
from quant.stats import Grid, channel_absmax, grid_from_absmax, observe
from quant.wire import (DTYPES, Instruction, Limits, LsqReply, ScoutReply, StatsReply, WireError,
                        decode_instruction, decode_lsq_reply, decode_scout_reply, decode_stats_reply,
                        encode_instruction, encode_lsq_reply, encode_scout_reply, encode_stats_reply,
                        pack, payload_nbytes, smallest_count_dtype, unpack)

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def qparams(version=3):
    return QParams(
        points={
            "m.l0.q:input": PointParams(activation_spec(8), np.float32(0.02), np.uint8(130)),
            "m.l0.q:weight": PointParams(weight_spec(8), np.linspace(0.01, 0.02, 6), np.zeros(6)),
            "m.l0.d:input": PointParams(activation_spec(16), np.float32(0.5), np.int16(0)),
            "m.l0.d:weight": PointParams(weight_spec(4, group_size=4), np.full((6, 2), 0.1), np.zeros((6, 2))),
            "m.l0.o:input": PointParams(activation_spec(8, signed=True), np.float32(0.1), np.int8(-3)),
        },
        model="fp", version=version, smoothing={"m.l0.q": np.arange(1, 9, dtype=np.float32)},
        meta={"profile": "u8"})


KEYS = ["m.l0.q:input", "m.l0.d:input", "m.l0.o:input"]


def stats_instruction(bins=64, round_=7, version=3):
    grids = {k: grid_from_absmax([3.0 + i], bins) for i, k in enumerate(KEYS)}
    return Instruction(round_, "stats", qparams(version), grids=grids, absmax={"m.l0.q:input": 8})


def stats_reply(ins, scale=1.0):
    st_, am = {}, {}
    for i, k in enumerate(ins.keys):
        x = RNG.normal(size=(5, 8)).astype(np.float32) * scale * (i + 1)
        st_[k] = observe(x, ins.grids[k])
        if k in ins.absmax:
            am[k] = channel_absmax(x)
    return StatsReply(st_, am)


def roundtrip_json(header):
    return json.loads(json.dumps(header))


# ---------------------------------------------------------------------------------------------
# pack / unpack

def test_pack_groups_by_dtype_and_round_trips_exactly():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.uint16(7), "c": np.zeros(0, np.int64),
              "d": np.array([1.5, -2.0], dtype=">f4"), "e": np.array([-1, 2], dtype=np.int64),
              "f": np.array([255], dtype=np.uint8)}
    flat, index = pack(arrays)
    assert sorted(flat) == ["float32", "int64", "uint16", "uint8"]
    assert all(a.ndim == 1 and a.dtype.isnative for a in flat.values())
    assert flat["float32"].size == 8 and flat["int64"].size == 2
    back = unpack(flat, roundtrip_json(index))
    assert list(back) == list(arrays)
    for k, a in arrays.items():
        assert back[k].shape == a.shape and back[k].dtype.name == a.dtype.name
        np.testing.assert_array_equal(back[k], a)
    back["a"][0, 0] = 99                                   # copies, not views into flat
    assert flat["float32"][0] == 0


def test_pack_refuses_dtypes_off_the_wire():
    for bad in (np.array([True]), np.array([1 + 2j]), np.array(["x"]), np.array([object()])):
        with pytest.raises(ValueError, match="cannot go on the wire"):
            pack({"x": bad})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3)),
                max_size=8, unique_by=lambda t: repr(t)))
def test_pack_unpack_any_arrays(spec):
    arrays = {f"n{i}": (RNG.integers(0, 100, size=shape)).astype(dt) for i, (dt, shape) in enumerate(spec)}
    flat, index = pack(arrays)
    back = unpack(flat, index)
    assert list(back) == list(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and back[k].shape == arrays[k].shape
        np.testing.assert_array_equal(back[k], arrays[k])


def _bad(flat, index, code, match, limits=Limits()):
    with pytest.raises(WireError, match=match) as e:
        unpack(flat, index, limits)
    assert e.value.code == code and isinstance(e.value, ValueError)


def test_unpack_refuses_every_inconsistency_and_says_where():
    flat, index = pack({"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.float32),
                        "c": np.arange(2, dtype=np.int64)})
    _bad({**flat, "complex64": np.zeros(1, np.complex64)}, index, "dtype", "complex64")
    _bad({**flat, "float32": flat["float32"].astype(np.float64)}, index, "dtype", "holds float64")
    _bad({**flat, "float32": flat["float32"].reshape(7, 1)}, index, "shape", "1-D")
    _bad({**flat, "float32": list(flat["float32"])}, index, "malformed", "not an array")
    _bad(flat, [*index[:2], ["c", "int64", 1, [2]]], "shape", r"entry 2 \('c'\).*exceed")
    _bad(flat, [index[0], ["b", "float32", 3, [3]], index[2]], "malformed", "'b' overlaps 'a'|'a' overlaps")
    _bad(flat, [index[0], ["a", "float32", 4, [3]], index[2]], "malformed", "duplicate")
    _bad(flat, [index[0], index[2]], "shape", r"flat\['float32'\] has 7 elements, the index covers 4")
    _bad(flat, [*index[:2], ["c", "int32", 0, [2]]], "dtype", "no flat array of dtype int32")
    _bad(flat, [*index[:2], ["c", "bool", 0, [2]]], "dtype", "not a wire dtype")
    _bad(flat, [*index[:2], ["c", "int64", -1, [2]]], "malformed", "offset")
    _bad(flat, [*index[:2], ["c", "int64", True, [2]]], "malformed", "offset")
    _bad(flat, [*index[:2], ["c", "int64", 0, [-2]]], "shape", "shape must be")
    _bad(flat, [*index[:2], ["c", "int64", 0, 2]], "shape", "shape must be")
    _bad(flat, [*index[:2], ["c", "int64", 0]], "malformed", r"entry 2: expected \[name")
    _bad(flat, [*index[:2], [7, "int64", 0, [2]]], "malformed", "name")
    _bad(flat, {"a": 1}, "malformed", "index must be a list")
    _bad(flat, index, "too_large", "limit 20", Limits(max_bytes=20))
    _bad(flat, index, "too_large", "3 entries", Limits(max_entries=2))
    assert set(unpack(flat, index)) == {"a", "b", "c"}


def test_smallest_count_dtype_is_exact_at_the_boundaries():
    for top, dt in [(0, "uint8"), (255, "uint8"), (256, "uint16"), (65535, "uint16"), (65536, "uint32"),
                    (2**32 - 1, "uint32"), (2**32, "uint64")]:
        assert smallest_count_dtype(np.array([0, top], dtype=np.int64)) == np.dtype(dt)
    assert smallest_count_dtype(np.zeros(0, np.int64)) == np.uint8
    with pytest.raises(ValueError):
        smallest_count_dtype(np.array([-1]))
    with pytest.raises(ValueError):
        smallest_count_dtype(np.array([1.5]))


# ---------------------------------------------------------------------------------------------
# Payloads

def test_instruction_round_trip_is_exact():
    ins = stats_instruction()
    flat, header = encode_instruction(ins)
    assert len(flat) <= 6                                  # one array per dtype, not per point
    back = decode_instruction(flat, json.dumps(header))
    assert (back.round, back.job, back.keys, back.absmax) == (ins.round, ins.job, ins.keys, ins.absmax)
    assert back.grids == ins.grids and back.version == 3
    qa, qb = ins.qparams, back.qparams
    assert (qb.model, qb.version, qb.meta) == (qa.model, qa.version, qa.meta)
    for k, p in qa.points.items():
        assert qb.points[k].spec == p.spec
        assert qb.points[k].scale.dtype == np.float32 and qb.points[k].zero_point.dtype == p.zero_point.dtype
        np.testing.assert_array_equal(qb.points[k].scale, p.scale)
        np.testing.assert_array_equal(qb.points[k].zero_point, p.zero_point)
    np.testing.assert_array_equal(qb.smoothing["m.l0.q"], qa.smoothing["m.l0.q"])
    assert back.digest == ins.digest
    lsq = Instruction(2, "lsq", qparams(), keys=KEYS)
    back = decode_instruction(*encode_instruction(lsq))
    assert back.keys == tuple(sorted(KEYS)) and back.grids == {} and back.digest == lsq.digest


def test_instruction_refuses_bad_zero_points_and_scales():
    flat, header = encode_instruction(stats_instruction())
    bad = {**flat, "float32": flat["float32"].copy()}
    bad["float32"][0] = -1.0                                # first scale (sorted keys: m.l0.d:input)
    with pytest.raises(WireError) as e:
        decode_instruction(bad, header)
    assert e.value.code == "scale_range"
    bad = {**flat, "int16": np.array([5], dtype=np.int16)}  # symmetric int16 needs z = 0
    with pytest.raises(WireError) as e:
        decode_instruction(bad, header)
    assert e.value.code == "zero_point_range"
    h = roundtrip_json(header)
    h["job"] = "train"
    with pytest.raises(WireError) as e:
        decode_instruction(flat, h)
    assert e.value.code == "malformed"


def test_scout_reply_round_trip_and_absmax():
    ins = Instruction(1, "scout", QParams({}), keys=KEYS)
    reply = ScoutReply({"m.l0.q:input": (-1.5, 3.0), "m.l0.d:input": (0.0, 2.0), "m.l0.o:input": (np.inf, -np.inf)},
                       {"m.l0.q:input": 40, "m.l0.d:input": 40, "m.l0.o:input": 0})
    flat, header = encode_scout_reply(reply, ins)
    back = decode_scout_reply(flat, json.dumps(header), ins)
    assert (back.ranges, back.n, back.channel_absmax) == (reply.ranges, reply.n, {})
    assert back.absmax == {"m.l0.q:input": 3.0, "m.l0.d:input": 2.0}


def test_scout_reply_carries_the_per_channel_absmax_asked_for():
    """With smoothing the scouting round also asks for per-channel abs-max (float32, exact);
    a missing, misshapen, negative or NaN vector is refused with its code."""
    ins = Instruction(1, "scout", QParams({}), keys=KEYS, absmax={"m.l0.q:input": 4})
    ranges = {k: (-1.0, 1.0) for k in KEYS}
    good = np.array([0.5, 3.0, 0.0, 1e-8], dtype=np.float32)
    flat, header = encode_scout_reply(ScoutReply(ranges, {k: 8 for k in KEYS}, {"m.l0.q:input": good}), ins)
    back = decode_scout_reply(flat, json.dumps(header), ins)
    assert back.channel_absmax["m.l0.q:input"].dtype == np.float32
    np.testing.assert_array_equal(back.channel_absmax["m.l0.q:input"], good)
    with pytest.raises(ValueError, match="abs-max"):
        encode_scout_reply(ScoutReply(ranges, {k: 8 for k in KEYS}), ins)
    for bad, code in ((np.array([0.5, -1.0, 0, 0], np.float32), "absmax_range"),
                      (np.array([np.nan, 1.0, 0, 0], np.float32), "nan")):
        flat, header = encode_scout_reply(ScoutReply(ranges, {k: 8 for k in KEYS}, {"m.l0.q:input": bad}), ins)
        with pytest.raises(WireError) as e:
            decode_scout_reply(flat, json.dumps(header), ins)
        assert e.value.code == code
    no_absmax = Instruction(1, "scout", QParams({}), keys=KEYS)
    flat, header = encode_scout_reply(ScoutReply(ranges, {k: 8 for k in KEYS}), no_absmax)
    with pytest.raises(WireError) as e:
        decode_scout_reply(flat, json.dumps(header), ins)   # answers an instruction without the abs-max request
    assert e.value.code == "wrong_request"
    with pytest.raises(ValueError, match="absmax"):
        Instruction(1, "lsq", QParams({}), absmax={"m.l0.q:input": 4})


def test_stats_reply_round_trip_is_exact_with_the_smallest_count_dtype():
    ins = stats_instruction()
    reply = stats_reply(ins)
    flat, header = encode_stats_reply(reply, ins)
    assert "uint8" in flat and header["index"][0][:2] == ["counts", "uint8"]
    back = decode_stats_reply(flat, json.dumps(header), ins)
    assert set(back.stats) == set(KEYS)
    for k in KEYS:
        assert back.stats[k] == reply.stats[k]
    np.testing.assert_array_equal(back.absmax["m.l0.q:input"], reply.absmax["m.l0.q:input"])
    flat32, header32 = encode_stats_reply(reply, ins, count_dtype="uint32")   # fixed (secure aggregation)
    assert flat32["uint32"].size == 3 * 64
    assert decode_stats_reply(flat32, header32, ins).stats["m.l0.q:input"] == reply.stats["m.l0.q:input"]


def test_stats_reply_refuses_counts_for_other_grids():
    ins = stats_instruction(bins=64)
    flat, header = encode_stats_reply(stats_reply(ins), ins)
    other = stats_instruction(bins=32)
    with pytest.raises(WireError) as e:           # the digest names the instruction it answers
        decode_stats_reply(flat, header, other)
    assert e.value.code == "wrong_request"
    h = roundtrip_json(header)
    h["request"] = other.digest
    with pytest.raises(WireError, match=r"counts: shape \(192,\), expected \(96,\)") as e:
        decode_stats_reply(flat, h, other)
    assert e.value.code == "shape"
    with pytest.raises(ValueError, match="grid"):
        encode_stats_reply(stats_reply(ins), Instruction(7, "stats", qparams(), grids={
            k: Grid.snap(-1, 1, 64) for k in KEYS}, absmax={"m.l0.q:input": 8}))


def test_replies_name_the_round_and_version_they_answer():
    ins = stats_instruction()
    flat, header = encode_stats_reply(stats_reply(ins), ins)
    for other, code in [(stats_instruction(round_=8), "stale_round"), (stats_instruction(version=4), "wrong_version")]:
        with pytest.raises(WireError) as e:
            decode_stats_reply(flat, header, other)
        assert e.value.code == code


def test_lsq_reply_round_trip():
    ins = Instruction(4, "lsq", qparams(), keys=[*KEYS, "m.l0.q:weight"])
    reply = LsqReply({k: RNG.normal(size=ins.qparams.points[k].scale.shape).astype(np.float32) for k in ins.keys},
                     {k: RNG.normal(size=ins.qparams.points[k].scale.shape).astype(np.float32) for k in ins.keys},
                     2.5, 2.25)
    flat, header = encode_lsq_reply(reply, ins)
    assert list(flat) == ["float32"] and flat["float32"].size == 2 * (3 + 6) + 2
    back = decode_lsq_reply(flat, json.dumps(header), ins)
    assert (back.loss_before, back.loss_after) == (2.5, 2.25)
    for k in ins.keys:
        assert back.delta_log_s[k].shape == ins.qparams.points[k].scale.shape
        np.testing.assert_array_equal(back.delta_log_s[k], reply.delta_log_s[k])
        np.testing.assert_array_equal(back.delta_beta[k], reply.delta_beta[k])


def test_statistics_reply_bytes_for_240_points(capsys):
    """Design budget (s. 6): about 250 KB per reply at 256 bins (float32 counts), 2 MB at 2048."""
    keys = [f"model.layers.{i // 8}.mlp.proj_{i % 8}:input" for i in range(240)]
    qp = QParams({k: PointParams(activation_spec(8), np.float32(0.02), np.uint8(128)) for k in keys}, "fp", 1)
    x = RNG.normal(size=4 * 128 * 576).astype(np.float32)   # 4 sequences of 128 tokens, 576 channels
    sizes = {}
    for bins in (256, 2048):
        grid = grid_from_absmax([5.0], bins)
        ins = Instruction(1, "stats", qp, grids={k: grid for k in keys})
        s = observe(x, grid)
        flat, header = encode_stats_reply(StatsReply({k: s for k in keys}), ins)
        count_dtype = next(d for d in flat if d.startswith("uint"))
        sizes[bins] = (payload_nbytes(flat, header), len(json.dumps(header)), count_dtype)
        assert sizes[bins][1] < 400                          # the header does not grow with the points
    with capsys.disabled():
        print(f"\nstats reply, 240 points: {sizes}")
    assert sizes[256][0] < 250_000 and sizes[2048][0] < 2_000_000

"""Weight ranges by the fleet's importance (``server.weight_ranges``): the scouting round's
per-channel sums of squares on the wire, their merge, and one derivation of the weight points on
the server, on the device and in torch."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from client.jobs import scout
from client.runtime import DeviceRuntime, PatchRefused, ort_session, save_device_bundle
from quant.export import export_float_onnx, float_linears
from quant.instrument import QuantConfig, get_qparams, quantize_, set_qparams
from quant.qdq import export_qdq
from quant.qparams import QParams, diff_qparams, load_qparams, save_qparams
from quant.rotation import rotate
from quant.smoothing import smoothed_weight_point
from quant.spec import activation_spec, weight_spec
from quant.stats import channel_sqsum
from quant.weight_ranges import weight_point
from quant.wire import (Instruction, ScoutReply, WireError, decode_instruction, decode_scout_reply,
                        encode_instruction, encode_scout_reply)
from server.aggregate import merge_importance
from server.config import ServerConfig
from server.rounds import importance_qparams, importance_request, instructions_for
from server.state import initial_state, load_checkpoint, save_checkpoint, states_equal
from simulation.models import tiny_qwen2
from test_client import ids
from test_export import minmax_qparams

W4 = weight_spec(4, group_size=16, symmetric=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny Qwen2 with 4-bit weights in groups of 16 (where the choice of range matters), its
    float graph and a device bundle."""
    d = tmp_path_factory.mktemp("importance")
    model = tiny_qwen2()
    export_float_onnx(model, d / "float.onnx")
    qp = minmax_qparams(model, torch.from_numpy(ids(1, (4, 32))), activation_spec(8), W4)
    save_device_bundle(model, qp, d / "qdq.onnx", float_onnx=d / "float.onnx")
    return dict(model=model, qp=qp, dir=d, weights={p: w for p, (w, _) in float_linears(model).items()})


def test_channel_sqsum_is_the_per_channel_sum_of_squares():
    x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(channel_sqsum(x), (x.astype(np.float64) ** 2).sum(axis=(0, 1)), rtol=1e-12)
    assert channel_sqsum(x).dtype == np.float64
    with pytest.raises(ValueError, match="non-finite"):
        channel_sqsum(np.full((2, 3), np.inf, np.float32))


def _scout_ins(qp, keys=("a:input", "b:input")):
    return Instruction(1, "scout", qp, keys=keys, sqsum={keys[0]: 4})


def test_a_scouting_reply_carries_its_sums_of_squares_and_lies_are_refused():
    qp = QParams({})
    ins = decode_instruction(*encode_instruction(_scout_ins(qp)))
    assert ins.sqsum == {"a:input": 4}
    good = np.array([1.0, 4.0, 0.0, 9.0])
    reply = ScoutReply({"a:input": (-3.0, 3.0), "b:input": (0.0, 1.0)}, {"a:input": 8, "b:input": 2},
                       channel_sqsum={"a:input": good})
    back = decode_scout_reply(*encode_scout_reply(reply, ins), ins)
    np.testing.assert_array_equal(back.channel_sqsum["a:input"], good)
    # 8 values over 4 channels: 2 tokens within [-3, 3] sum to at most 18 per channel
    for bad, code in ((np.array([1.0, -1.0, 0, 0]), "sqsum_range"), (np.array([1.0, np.nan, 0, 0]), "nan"),
                      (np.array([19.0, 0, 0, 0]), "sqsum_range")):
        flat, header = encode_scout_reply(ScoutReply(reply.ranges, reply.n, channel_sqsum={"a:input": bad}), ins)
        with pytest.raises(WireError) as e:
            decode_scout_reply(flat, header, ins)
        assert e.value.code == code
    with pytest.raises(ValueError, match="sqsum belongs to scouting"):
        Instruction(1, "eval", qp, keys=("a:input",), sqsum={"a:input": 4})
    with pytest.raises(ValueError, match="sqsum keys"):
        Instruction(1, "scout", qp, keys=("b:input",), sqsum={"a:input": 4})


def _replies(rng, n=6, c=8):
    out = []
    for i in range(n):
        x = rng.normal(size=(10 + i, c)) * np.linspace(0.5, 3.0, c)
        out.append(ScoutReply({"l:input": (float(x.min()), float(x.max()))}, {"l:input": x.size},
                              channel_sqsum={"l:input": (x ** 2).sum(axis=0)}))
    return out


def test_the_pooled_merge_is_the_pooled_mean_square_in_any_order():
    rng = np.random.default_rng(1)
    replies = _replies(rng)
    h = merge_importance(replies, "sum")["l"]
    pooled = sum(r.channel_sqsum["l:input"] for r in replies) / sum(r.n["l:input"] // 8 for r in replies)
    np.testing.assert_allclose(h, pooled, rtol=1e-6)
    shuffled = replies[:]
    random.Random(0).shuffle(shuffled)
    assert merge_importance(shuffled, "sum")["l"].tobytes() == h.tobytes()      # federated == centralized


def test_the_robust_merge_keeps_a_liar_within_the_honest_shares():
    rng = np.random.default_rng(2)
    honest = _replies(rng, n=7)
    shares = np.stack([r.channel_sqsum["l:input"] / r.channel_sqsum["l:input"].sum() for r in honest])
    liar_sq = np.zeros(8)
    liar_sq[0] = 1e6                                                     # all its energy on channel 0
    liar = ScoutReply({"l:input": (-1e3, 1e3)}, {"l:input": 8 * 10}, channel_sqsum={"l:input": liar_sq})
    h = merge_importance([*honest, liar], "trimmed", 0.25)["l"]
    assert np.all(h >= shares.min(axis=0) - 1e-7) and np.all(h <= shares.max(axis=0) + 1e-7)
    assert merge_importance([*honest, liar], "sum")["l"][0] > 100 * h[0]   # the exact rule has no defence


def test_a_ranked_weight_point_is_the_least_weighted_rounding_error(bundle):
    w = bundle["weights"]["model.layers.0.mlp.down_proj"]
    rng = np.random.default_rng(3)
    h = rng.uniform(0.0, 4.0, w.shape[1]).astype(np.float32)
    m = rng.uniform(0.5, 2.0, w.shape[1]).astype(np.float32)
    got = smoothed_weight_point(w, m, W4, importance=h)
    want = weight_point(w * m, W4, h / m ** 2)
    assert got.scale.tobytes() == want.scale.tobytes() and got.zero_point.tobytes() == want.zero_point.tobytes()
    minmax = smoothed_weight_point(w, m, W4)
    assert not np.array_equal(got.scale, minmax.scale)
    # a rotated Linear's importance is of its rotated input's channels: taken as it is, not over m^2
    rotated = smoothed_weight_point(w, m, W4, 16, importance=h)
    want = weight_point(rotate(w * m, 16), W4, h)
    assert rotated.scale.tobytes() == want.scale.tobytes() and rotated.zero_point.tobytes() == want.zero_point.tobytes()
    assert not np.array_equal(rotated.scale, smoothed_weight_point(w, m, W4, 16).scale)     # not min-max


def _ranked_server_qparams(bundle):
    """The server's QParams after a scouting round of two clients with ``weight_ranges = importance``."""
    qp, weights = bundle["qp"], bundle["weights"]
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx")
    cfg = ServerConfig(schedule=[{"job": "scout"}], weight_ranges={"w4": "importance"}, stats_rule="sum")
    request = importance_request({"w4": qp}, cfg, weights)
    assert set(request) == {f"{p}:input" for p in weights}
    ins = instructions_for(initial_state({"w4": qp}, "d"), 1, cfg.schedule[0], cfg, weights)["w4"]
    assert ins.sqsum == request
    replies = [scout(rt, ins, ids(s, (3, 32)))[0] for s in (5, 6)]
    importance = merge_importance(replies, "sum")
    return importance_qparams(qp, importance, weights, 1), importance


def test_device_torch_and_server_derive_the_same_ranked_weights(bundle, tmp_path):
    """An instruction carries the importance, not the weight scales: the device derives every
    ranked weight point from its own float weights, the same bits as the server and as torch's
    ``set_qparams``, and its model is a fresh export of the server's QParams, logits bit for bit."""
    model, qp = bundle["model"], bundle["qp"]
    server, importance = _ranked_server_qparams(bundle)
    assert set(server.importance) == set(bundle["weights"])
    changed = [r["key"] for r in diff_qparams(qp, server) if r["key"].endswith(":weight")]
    assert len(changed) >= len(bundle["weights"]) // 2          # at 4 bits most groups clip
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx")
    sent = QParams({k: p for k, p in server.points.items() if k.endswith(":input")}, server.model, 1, {},
                   server.meta, server.importance)
    sent = decode_instruction(*encode_instruction(Instruction(2, "eval", sent))).qparams   # over the wire
    rt.patch(sent)
    for k in server.points:
        assert rt.qparams.points[k].scale.tobytes() == server.points[k].scale.tobytes(), k
        assert rt.qparams.points[k].zero_point.tobytes() == server.points[k].zero_point.tobytes(), k
    export_qdq(model, server, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    x = ids(9, (2, 32))
    np.testing.assert_array_equal(rt.logits(x), ort_session(tmp_path / "re.onnx").run(["logits"], {"input_ids": x})[0])
    tm = copy.deepcopy(model)
    quantize_(tm, QuantConfig(weight=W4))
    set_qparams(tm, QParams(dict(sent.points), get_qparams(tm).model, 1, {}, {}, sent.importance))
    for k in server.points:
        if k.endswith(":weight"):
            assert get_qparams(tm).points[k].scale.tobytes() == server.points[k].scale.tobytes(), k
    with pytest.raises(PatchRefused, match="importance"):
        rt.patch(QParams({}, qp.model, 3, {}, {}, {"model.layers.0.mlp.down_proj": np.ones(3, np.float32)}))


def test_importance_survives_the_file_and_the_checkpoint(bundle, tmp_path):
    server, _ = _ranked_server_qparams(bundle)
    back = load_qparams(save_qparams(server, tmp_path / "q.safetensors"))
    assert set(back.importance) == set(server.importance)
    assert all(back.importance[k].tobytes() == server.importance[k].tobytes() for k in server.importance)
    assert diff_qparams(server, back) == []
    state = initial_state({"w4": server}, "d")
    save_checkpoint(state, tmp_path / "ckpt.safetensors")
    assert states_equal(load_checkpoint(tmp_path / "ckpt.safetensors", expect_digest="d"), state)


def test_configs_that_cannot_rank_are_refused():
    with pytest.raises(ValueError, match="collects: the schedule has none"):
        ServerConfig(schedule=[{"job": "lsq"}], weight_ranges={"w4": "importance"})
    with pytest.raises(ValueError, match="secure.scout"):
        ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}], weight_ranges={"w4": "importance"},
                     stats_rule="sum", secure={})
    plain = ServerConfig(schedule=[{"job": "scout"}])
    assert plain.digest() == ServerConfig(schedule=[{"job": "scout"}], weight_ranges={}).digest()
    assert plain.digest() != ServerConfig(schedule=[{"job": "scout"}], weight_ranges={"w4": "importance"}).digest()

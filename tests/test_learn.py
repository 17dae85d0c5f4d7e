"""The learned-range job (client/learn.py) on a briefly trained tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from client.learn import learn_ranges
from quant.calibrate import CalibratorConfig
from quant.instrument import QuantConfig, get_qparams, quant_points, quantize_, set_qparams
from quant.learn_config import LearnConfig
from quant.lsq import init_from_qparams, to_qparams
from quant.ptq import activation_qparams, activation_specs, collect_stats, grids_for, scout_ranges
from quant.qparams import PointParams
from quant.wire import Instruction, decode_lsq_reply, encode_lsq_reply
from server.aggregate import learned_from_qparams
from simulation.models import tiny_llama

torch.set_num_threads(1)
VOCAB = 257


def seqs(seed, n, length=32):
    """Arithmetic token sequences (a learnable pattern, so quantization noise shows in the loss)."""
    r = np.random.default_rng(seed)
    start, stride = r.integers(0, VOCAB, (n, 1)), r.integers(1, 5, (n, 1))
    return ((start + stride * np.arange(length)) % VOCAB).astype(np.int64)


def nll(model, data):
    with torch.no_grad():
        return float(model(input_ids=torch.from_numpy(data), labels=torch.from_numpy(data)).loss)


def logits(model, data):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(data)).logits


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for i in range(120):
        ids = torch.from_numpy(seqs(100 + i, 16))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    quantize_(model, QuantConfig())
    data = seqs(0, 16)
    batches = [torch.from_numpy(data[i:i + 8]) for i in range(0, len(data), 8)]
    grids = grids_for(scout_ranges(model, batches), 256)
    aq = activation_qparams(collect_stats(model, batches, grids), activation_specs(model),
                            CalibratorConfig(method="minmax"))
    wide = {k: PointParams(p.spec, p.scale * 4, p.zero_point) for k, p in aq.items()}
    qp = get_qparams(model).with_points(wide, version=3)
    set_qparams(model, qp)
    ins = Instruction(5, "lsq", qp, keys=sorted(wide))
    return dict(model=model, qp=qp, ins=ins, data=data)


@pytest.mark.parametrize("loss", ["next_token", "distill"])
def test_learning_lowers_loss_and_leaves_model_as_it_was(setup, loss):
    model, qp, ins, data = setup["model"], setup["qp"], setup["ins"], setup["data"]
    before = logits(model, data)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    reply, metrics = learn_ranges(model, qp, ins, data, LearnConfig(loss=loss))
    print(f"\n{loss}: loss {reply.loss_before:.5f} -> {reply.loss_after:.5f}, "
          f"{metrics['wall_s']:.2f} s, max rss {metrics['max_rss_mb']:.0f} MB")
    assert reply.loss_after < reply.loss_before
    assert metrics["num-examples"] == len(data) and metrics["loss_before"] == reply.loss_before
    assert {"wall_s", "max_rss_mb", "batch_size", "tokens"} <= set(metrics)
    assert set(reply.delta_log_s) == set(ins.keys) == set(reply.delta_beta)
    assert any(np.any(d != 0) for d in reply.delta_log_s.values())
    # left reusable: quant mode, starting qparams, same logits, requires_grad as before
    assert all(quant_points(model)[k].mode == "quant" for k in ins.keys)
    assert not list(p for q in quant_points(model).values() for p in (q.log_s, q.beta) if p is not None)
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=0)
    for k, p in get_qparams(model).points.items():
        np.testing.assert_array_equal(p.scale, qp.points[k].scale)
        np.testing.assert_array_equal(p.zero_point, qp.points[k].zero_point)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_reply_round_trips_and_applied_delta_lowers_loss(setup):
    model, qp, ins, data = setup["model"], setup["qp"], setup["ins"], setup["data"]
    reply, _ = learn_ranges(model, None, ins, data)
    flat, header = encode_lsq_reply(reply, ins)
    back = decode_lsq_reply(flat, json.dumps(header), ins)
    assert (back.loss_before, back.loss_after) == pytest.approx((reply.loss_before, reply.loss_after))
    for k in ins.keys:
        np.testing.assert_array_equal(back.delta_log_s[k], reply.delta_log_s[k])
        np.testing.assert_array_equal(back.delta_beta[k], reply.delta_beta[k])
    # the server's side: its (log s, beta) from the QParams, plus the delta, to integer (s, z)
    g_log_s, g_beta = learned_from_qparams({k: qp.points[k] for k in ins.keys})
    for k in ins.keys:  # the client's global is the server's, bit for bit
        ls, b = init_from_qparams(qp.points[k].scale, qp.points[k].zero_point, qp.points[k].spec)
        np.testing.assert_array_equal(ls.numpy(), g_log_s[k])
        np.testing.assert_array_equal(b.numpy(), g_beta[k])
    new = {k: PointParams(qp.points[k].spec, *to_qparams(g_log_s[k] + back.delta_log_s[k],
                                                         g_beta[k] + back.delta_beta[k], qp.points[k].spec))
           for k in ins.keys}
    start = nll(model, data)
    try:
        set_qparams(model, qp.with_points(new))
        learned = nll(model, data)
    finally:
        set_qparams(model, qp)
    print(f"\nlocal nll with the starting qparams {start:.5f}, with global + delta {learned:.5f}")
    assert learned < start


def test_zero_steps_give_zero_delta(setup):
    model, qp, ins, data = setup["model"], setup["qp"], setup["ins"], setup["data"]
    reply, metrics = learn_ranges(model, qp, list(ins.keys), data, LearnConfig(steps=0))
    assert all(np.all(d == 0) for d in reply.delta_log_s.values())
    assert all(np.all(d == 0) for d in reply.delta_beta.values())
    assert reply.loss_before == reply.loss_after and metrics["tokens"] == 0


def test_which_all_learns_weights_and_refusals(setup):
    model, qp, data = setup["model"], setup["qp"], setup["data"]
    w = "model.layers.0.mlp.down_proj:weight"
    a = "model.layers.0.mlp.down_proj:input"
    with pytest.raises(ValueError, match="which='activations'"):
        learn_ranges(model, qp, [w], data)
    with pytest.raises(ValueError, match="not quantization points"):
        learn_ranges(model, qp, ["nope:input"], data)
    with pytest.raises(ValueError, match="token ids"):
        learn_ranges(model, qp, [a], np.zeros((3,), dtype=np.int64))
    with pytest.raises(ValidationError):
        LearnConfig(steps=2, bogus=1)
    before = logits(model, data)
    reply, _ = learn_ranges(model, qp, [a, w], data, LearnConfig(which="all", steps=2))
    assert reply.delta_log_s[w].shape == qp.points[w].scale.shape and np.any(reply.delta_log_s[w] != 0)
    # symmetric weights: beta = -z_sym * s with z_sym = 0, so no beta delta
    np.testing.assert_array_equal(reply.delta_beta[w], 0)
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=0)

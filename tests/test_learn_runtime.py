"""The runtime learned-range job (issue 17): quant.reconstruct's weighted histograms and search,
client.learn_runtime on a tiny Qwen2 device bundle (the reply the server validates and aggregates,
the integer model closer to float after it, no torch imported), and the learn.method switch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client.learn_runtime import (column_sq_norms, consumer_weights, learn_ranges_runtime, local_histograms,
                                  runtime_keys)
from client.runtime import DeviceRuntime, save_device_bundle
from quant import reconstruct as rc
from quant.affine import range_to_qparams
from quant.calibrate import mse_range
from quant.export import export_float_onnx
from quant.learn_config import LearnConfig
from quant.qparams import PointParams
from quant.spec import activation_spec
from quant.stats import Grid, observe
from quant.wire import Instruction, encode_lsq_reply
from server.aggregate import fedavg_step, learned_from_qparams, to_integer_qparams, weighted_mean
from server.validate import Rejection, validate_lsq_reply
from simulation.models import tiny_qwen2
from test_export import minmax_qparams

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 257
U8 = activation_spec(8)


def ids(seed, shape=(8, 32)):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int64)


# ------------------------------------------------------------------------------ quant.reconstruct

def _acts(seed=0, n=400, c=16):
    x = np.random.default_rng(seed).normal(size=(n, c)).astype(np.float32)
    x[::50, 3] *= 30  # an outlier channel
    return x


def test_weighted_histograms_add_up_exactly():
    x = _acts()
    d = np.random.default_rng(1).uniform(0.1, 2, 16)
    g = Grid.snap(-2.0, 2.0, 256)  # the outliers fall outside: kept as exact tail points
    whole = rc.observe_weighted(x, d, g)
    parts = [rc.observe_weighted(x[i:i + 100], d, g) for i in range(0, 400, 100)]
    merged = parts[0]
    for p in parts[1:]:
        merged = rc.merge_weighted(merged, p)
    assert np.allclose(merged.mass, whole.mass, rtol=1e-12)
    assert np.array_equal(merged.tail_x, whole.tail_x) and np.allclose(merged.tail_w, whole.tail_w)
    assert (merged.min, merged.max, merged.n) == (whole.min, whole.max, 400 * 16)
    assert merged.energy == pytest.approx(float((x.astype(np.float64) ** 2 * d).sum()), rel=1e-12)
    assert whole.tail_x.size == int(((x < -2) | (x >= 2)).sum()) > 0
    # weight in = weight out
    assert whole.mass.sum() + whole.tail_w.sum() == pytest.approx(float((np.ones_like(x) * d).sum()))


def test_unit_weights_give_the_mse_calibrators_range():
    """With every channel weighted 1 and a grid holding all values, the weighted histogram is the
    statistics histogram, and the search is the server's MSE calibrator's."""
    x = _acts()
    g = Grid.snap(float(x.min()), float(x.max()) + 1e-3, 512)
    h = rc.observe_weighted(x, np.ones(16), g)
    assert h.tail_x.size == 0
    assert rc.best_range(h, U8) == pytest.approx(mse_range(observe(x, g), U8))


def test_output_weights_clip_what_the_consumer_ignores():
    """An outlier channel whose consumer column is zero costs nothing in the output: its range is
    the bulk's; weighted 1 like the others, the outliers are kept."""
    x = _acts()
    g = rc.grid_for(*range_to_qparams(float(x.min()), float(x.max()), U8), U8)
    flat = rc.best_range(rc.observe_weighted(x, np.ones(16), g), U8)
    d = np.ones(16)
    d[3] = 0.0
    ignored = rc.best_range(rc.observe_weighted(x, d, g), U8)
    bulk = np.abs(np.delete(x, 3, axis=1)).max()
    assert flat[1] > 2 * bulk and ignored[1] <= 1.01 * bulk
    w = np.random.default_rng(0).normal(size=(8, 16))
    assert np.allclose(rc.output_weights(w), (w ** 2).sum(0))
    m = np.linspace(0.5, 2, 16)
    assert np.allclose(rc.output_weights(w, m), (w ** 2).sum(0) * m ** 2)


def test_grouped_weights_equal_exact_ones_when_the_classes_are_exact():
    """channel_groups + observe_grouped (the device's fast path) give the float-weighted histogram
    when every class holds one weight; with spread weights the total weight stays exact."""
    x = _acts()
    d = np.where(np.arange(16) % 2, 4.0, 1.0)
    d[5] = 0.0
    g = rc.grid_for(*range_to_qparams(-2.0, 2.0, U8), U8)
    exact = rc.observe_weighted(x, d, g)
    fast = rc.observe_grouped(x, rc.channel_groups(d, 16), g)
    assert np.allclose(fast.mass, exact.mass) and np.allclose(fast.tail_w, exact.tail_w)
    assert np.array_equal(fast.tail_x, exact.tail_x) and fast.energy == pytest.approx(exact.energy)
    spread = np.random.default_rng(2).uniform(0.1, 10, 16)
    approx = rc.observe_grouped(x, rc.channel_groups(spread, 4), g)
    total = float(spread.sum() * x.shape[0])
    assert approx.mass.sum() + approx.tail_w.sum() == pytest.approx(total)
    whole = rc._HIST_VALUES
    try:
        rc._HIST_VALUES = 3 * 16                # three rows at a time: the same counts and tails
        rows = rc.observe_grouped(x, rc.channel_groups(spread, 4), g)
    finally:
        rc._HIST_VALUES = whole
    assert np.array_equal(rows.mass, approx.mass) and np.array_equal(rows.tail_x, approx.tail_x)
    assert np.array_equal(rows.tail_w, approx.tail_w) and rows.tail_x.size > 0


def test_local_search_finds_what_the_full_search_finds():
    x = _acts()
    s, z = range_to_qparams(2 * float(x.min()), 2 * float(x.max()), U8)
    h = rc.observe_weighted(x, np.ones(16), rc.grid_for(s, z, U8))
    local = rc.reconstruct_point(h, s, z, U8)
    full = rc.reconstruct_point(h, s, z, U8, search="global")
    assert local["rel_after"] <= 1.02 * full["rel_after"] and local["rel_after"] < local["rel_before"]


def test_tail_cap_keeps_the_far_values_and_all_the_weight():
    x = np.linspace(3.0, 10.0, 1000, dtype=np.float32)[:, None]
    g = Grid.snap(-1.0, 1.0, 64)
    h = rc.observe_weighted(x, np.array([2.0]), g, tail_cap=10)
    assert h.tail_x.size == 10 and h.tail_w.sum() == pytest.approx(2000.0)
    assert h.tail_x.max() == pytest.approx(10.0) and h.tail_x.min() == g.hi  # the rest at the edge


def test_reconstruct_point_is_never_worse_and_its_delta_is_the_servers():
    x = _acts()
    s, z = range_to_qparams(4 * float(x.min()), 4 * float(x.max()), U8)  # a range 4x too wide
    h = rc.observe_weighted(x, np.ones(16), rc.grid_for(s, z, U8))
    r = rc.reconstruct_point(h, s, z, U8)
    assert r["rel_after"] < 0.5 * r["rel_before"] and r["delta_log_s"] < 0
    log_s, beta = learned_from_qparams({"k": PointParams(U8, s, z)})
    new = to_integer_qparams({"k": log_s["k"] + r["delta_log_s"]}, {"k": beta["k"] + r["delta_beta"]}, {"k": U8})["k"]
    s2, z2 = range_to_qparams(*r["range"], U8)
    assert new.scale == pytest.approx(s2, rel=1e-6) and new.zero_point == z2
    again = rc.reconstruct_point(rc.observe_weighted(x, np.ones(16), rc.grid_for(new.scale, new.zero_point, U8)),
                                 new.scale, new.zero_point, U8)
    assert again["rel_after"] <= again["rel_before"]
    assert abs(float(again["delta_log_s"])) < 0.05  # at the optimum: (almost) nothing left to move


def _same_search(hists, points):
    """reconstruct_points (the device's batched search) against reconstruct_point (one point at a
    time, the reference): the same range and delta bit for bit, the costs to 1e-9 (they are summed
    in another order)."""
    batched = rc.reconstruct_points(hists, points)
    assert set(batched) == set(hists)
    for k, h in hists.items():
        p = points[k]
        ref = rc.reconstruct_point(h, p.scale, p.zero_point, p.spec)
        got = batched[k]
        assert got["range"] == ref["range"], k
        assert np.array_equal(got["delta_log_s"], ref["delta_log_s"]), k
        assert np.array_equal(got["delta_beta"], ref["delta_beta"]), k
        assert got["rel_before"] == pytest.approx(ref["rel_before"], rel=1e-9, abs=1e-300), k
        assert got["rel_after"] == pytest.approx(ref["rel_after"], rel=1e-9, abs=1e-300), k
    return batched


def test_batched_search_chooses_what_the_per_point_search_chooses():
    """Asymmetric and symmetric (int16) specs, outlier tails (some capped), a point whose values
    are all one number, ranges too narrow and too wide, one block and many (tiny blocks)."""
    rng = np.random.default_rng(5)
    hists, points = {}, {}
    for i in range(40):
        spec = activation_spec(16) if i % 3 == 0 else U8
        c = int(rng.choice([8, 64]))
        x = (rng.standard_t(3, size=(50, c)) * rng.uniform(0.1, 10) + rng.uniform(-1, 1)).astype(np.float32)
        if i % 7 == 0:
            x = np.abs(x)
        if i % 11 == 0:
            x[:] = 1.5
        f = rng.uniform(0.15, 0.3) if i % 4 == 1 else rng.uniform(0.3, 3)   # some ranges far too narrow
        s, z = range_to_qparams(min(float(x.min()), 0) * f, max(float(x.max()), 0) * f + 1e-3, spec)
        hists[f"p{i}"] = rc.observe_grouped(x, rc.channel_groups(rng.lognormal(0, 1, c), 16), rc.grid_for(s, z, spec),
                                            tail_cap=int(rng.choice([5, 4096])))
        points[f"p{i}"] = PointParams(spec, s, z)
    assert sum(h.tail_x.size > 0 for h in hists.values()) >= 5
    moved = _same_search(hists, points)
    assert sum(float(r["delta_log_s"]) != 0 for r in moved.values()) >= 20
    small = rc._BLOCK_ELEMENTS
    try:
        rc._BLOCK_ELEMENTS = 1          # one point per block
        _same_search(hists, points)
    finally:
        rc._BLOCK_ELEMENTS = small


# ------------------------------------------------------------------------------ the device job

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("learn_runtime")
    model = tiny_qwen2()
    export_float_onnx(model, d / "float.onnx")
    good = minmax_qparams(model, torch.from_numpy(ids(1, (4, 32))))
    # a poor calibration: every activation range 4x wider than min-max
    wide = {}
    for k, p in good.points.items():
        if k.endswith(":input"):
            lo = (p.spec.qmin - p.zero_point.astype(np.float64)) * p.scale
            hi = (p.spec.qmax - p.zero_point.astype(np.float64)) * p.scale
            wide[k] = PointParams(p.spec, *range_to_qparams(4 * float(lo), 4 * float(hi), p.spec))
    qp = good.with_points(wide)
    save_device_bundle(model, qp, d / "qdq.onnx", float_onnx=d / "float.onnx")
    return dict(dir=d, qp=qp)


def _ins(qp):
    keys = tuple(sorted(k for k in qp.points if k.endswith(":input")))
    return Instruction(round=2, job="lsq", qparams=qp, keys=keys)


def _float_gap(rt, data):
    from client.runtime import ort_session

    f = ort_session(rt.float_onnx, threads=1).run(["logits"], {"input_ids": data})[0]
    return float(np.mean((rt.logits(data) - f) ** 2))


def test_runtime_job_reply_validates_and_moves_the_integer_model_toward_float(bundle):
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)
    qp = rt.qparams
    ins = _ins(qp)
    clients = [ids(10 + i, (6, 32)) for i in range(3)]
    replies, metrics = [], []
    for data in clients:
        reply, m = learn_ranges_runtime(rt, ins, data, LearnConfig(method="runtime"), batch_size=4)
        flat, header = encode_lsq_reply(reply, ins)
        got = validate_lsq_reply(flat, header, ins, m["num-examples"])
        assert not isinstance(got, Rejection), got
        replies.append(got)
        metrics.append(m)
        assert m["loss_after"] < 0.5 * m["loss_before"] and m["points"] == len(ins.keys)
        assert m["num-examples"] == 6 and m["batch_size"] == 4 and m["wall_s"] > 0
        parts = m["capture_s"] + m["histogram_s"] + m["search_s"]
        assert min(m["capture_s"], m["histogram_s"], m["search_s"]) > 0 and parts <= m["wall_s"]
    # every range was 4x too wide: the job narrows them
    d_ls = np.array([[float(r.delta_log_s[k]) for k in ins.keys] for r in replies])
    assert (d_ls < 0).mean() > 0.9
    keys = list(ins.keys)
    log_s, beta = learned_from_qparams({k: qp.points[k] for k in keys})
    x = {**{f"log_s/{k}": v for k, v in log_s.items()}, **{f"beta/{k}": v for k, v in beta.items()}}
    d = weighted_mean([{**{f"log_s/{k}": r.delta_log_s[k] for k in keys},
                        **{f"beta/{k}": r.delta_beta[k] for k in keys}} for r in replies], [6, 6, 6])
    x = fedavg_step(x, d)
    new = qp.with_points(to_integer_qparams({k: x[f"log_s/{k}"] for k in keys}, {k: x[f"beta/{k}"] for k in keys},
                                            {k: qp.points[k].spec for k in keys}), version=1)
    held_out = ids(99, (4, 32))
    before = _float_gap(rt, held_out)
    rt.patch(new)
    after = _float_gap(rt, held_out)
    assert after < 0.7 * before, (before, after)


def test_batched_search_on_the_tiny_models_histograms(bundle):
    """The device's histograms of every Linear input of the tiny model: the batched search picks
    the per-point search's ranges."""
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)
    ins = _ins(rt.qparams)
    hists = local_histograms(rt, ins, ids(3, (6, 32)), LearnConfig(method="runtime"), batch_size=4)
    moved = _same_search(hists, {k: ins.qparams.points[k] for k in ins.keys})
    assert all(float(r["delta_log_s"]) < 0 for r in moved.values())  # every range was 4x too wide


def test_runtime_job_refuses_what_it_cannot_learn(bundle):
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)
    qp = rt.qparams
    weight = next(k for k in qp.points if k.endswith(":weight"))
    with pytest.raises(ValueError, match="not inputs of Linears"):
        runtime_keys(rt, Instruction(round=2, job="lsq", qparams=qp, keys=(weight,)))
    with pytest.raises(ValueError, match="activation ranges only"):
        LearnConfig(method="runtime", which="all")
    with pytest.raises(ValueError, match="instruction"):
        runtime_keys(rt, Instruction(round=2, job="stats", qparams=qp, keys=()))


def test_column_norms_stream_from_the_bundle(bundle):
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)
    for path in rt.linears:
        w = rt.linears[path][0]
        assert np.allclose(column_sq_norms(rt.linears, path), (w.astype(np.float64) ** 2).sum(0), rtol=1e-6)
    k = "lm_head:input"
    assert np.allclose(consumer_weights(rt, k), rc.output_weights(rt.linears["lm_head"][0]), rtol=1e-6)


def test_asking_whether_a_linear_exists_reads_no_weight(bundle):
    """runtime_keys asks it for every point: a read per point cost the job on SmolLM2 0.6 s (211
    points, lm_head's 113 MB among them)."""
    rt = DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)
    lin, real = rt.linears, rt.linears._npz

    class NoReads:
        files, zip = real.files, real.zip

        def __getitem__(self, name):
            raise AssertionError(f"read {name}")

    lin._npz = NoReads()
    try:
        assert "lm_head" in lin and "lm_head" in lin.weights() and "nothing" not in lin
        assert runtime_keys(rt, _ins(rt.qparams)) and rt.activation_widths()
    finally:
        lin._npz = real


def test_runtime_job_imports_no_torch(bundle):
    code = f"""
import builtins, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):  # as on a phone: torch is not installed
    if name == "torch" or name.startswith("torch."):
        raise ImportError("torch is not installed on this device")
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import numpy as np
from client.learn_runtime import learn_ranges_runtime
from client.runtime import DeviceRuntime
from quant.learn_config import LearnConfig
from quant.wire import Instruction
rt = DeviceRuntime({str(bundle['dir'] / 'qdq.onnx')!r}, threads=1)
keys = tuple(sorted(k for k in rt.qparams.points if k.endswith(':input')))
ins = Instruction(round=2, job='lsq', qparams=rt.qparams, keys=keys)
data = np.random.default_rng(0).integers(0, 257, (4, 16)).astype(np.int64)
reply, m = learn_ranges_runtime(rt, ins, data, LearnConfig(method='runtime'))
assert len(reply.delta_log_s) == len(keys)
print('torch' in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:3])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("False"), out.stdout


# ------------------------------------------------------------------------------ config and simulation

def test_learn_method_leaves_the_preparation_digest_alone():
    from simulation.prepare import config_digest, load_simulation_config

    a = load_simulation_config(ROOT / "configs" / "default.toml")
    assert a.server.learn.method == "runtime"          # the default since the three splits
    b = load_simulation_config(ROOT / "configs" / "quality" / "torch_lsq.toml")
    assert b.server.learn.method == "torch" and config_digest(a) == config_digest(b)
    assert a.server.digest() != b.server.digest()       # the rounds differ, the preparation does not
    assert b.server.learn.given() == {"steps": 4, "batch_size": 2, "lr": 0.03, "beta_step_lsb": 0.5,
                                      "loss": "next_token", "method": "torch"}
    # configs/quality/runtime.toml (the README's earlier runs of it) is the default's recipe
    r = load_simulation_config(ROOT / "configs" / "quality" / "runtime.toml")
    assert r.server.digest() == a.server.digest() and config_digest(r) == config_digest(a)


def test_smoke_simulation_with_the_runtime_job(tmp_path):
    from test_simulate import SMOKE, simulate

    cfg = tmp_path / "runtime.toml"
    text = SMOKE.read_text()
    assert "learn = { steps = 2, batch_size = 2 }" in text
    cfg.write_text(text.replace("learn = { steps = 2, batch_size = 2 }", 'learn = { method = "runtime" }'))
    out = tmp_path / "run"
    t0 = time.perf_counter()
    simulate(out, config=cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lsq = [m for m in metrics if m["job"] == "lsq"]
    assert len(lsq) == 1 and lsq[0]["applied"] and not lsq[0]["rejections"], lsq
    for prof, losses in lsq[0]["lsq"].items():
        assert losses["loss_after"] <= losses["loss_before"], (prof, losses)
    assert all(m["bytes_up_per_client"] < 2000 for m in lsq)  # two float32 per point, as the torch job
    summary = json.loads((out / "summary.json").read_text())
    for p, s in summary["profiles"].items():
        assert all(math.isfinite(v) for v in s["federated_ppl"]), p
    print(f"runtime smoke run {time.perf_counter() - t0:.0f} s")

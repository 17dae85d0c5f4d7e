"""The device side: DeviceRuntime (patch by key, refusal, eval), the float-graph capture behind
the scout/statistics jobs, and device profiles. One tiny Qwen2 (q/k/v biases, so patching
re-quantizes int32 biases), exported once (the slow step)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from client.jobs import exposed_widths, evaluate, scout, statistics
from client.profiles import DeviceProfile, MemoryBudgetError, load_profile, plan_batch
from client.runtime import DeviceRuntime, PatchRefused, ort_session, save_device_bundle
from quant.configfile import ConfigError
from quant.export import export_float_onnx, float_linears
from quant.qdq import export_qdq
from quant.instrument import quantize_, set_mode
from quant.metrics import nll_sum_and_count
from quant.ptq import absmax_per_channel, collect_stats, grids_for, scout_ranges
from quant.affine import range_to_qparams
from quant.qparams import PointParams
from quant.stats import Grid
from quant.wire import Instruction
from simulation.models import tiny_qwen2
from test_export import fake_quant_reference, minmax_qparams

torch.set_num_threads(1)
VOCAB = 257
ROOT = Path(__file__).resolve().parents[1]


def ids(seed, shape=(8, 32)):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    model = tiny_qwen2()
    t0 = time.perf_counter()
    export_float_onnx(model, d / "float.onnx")
    print(f"\nfloat export {time.perf_counter() - t0:.1f} s")
    qp = minmax_qparams(model, torch.from_numpy(ids(1, (4, 32))))
    save_device_bundle(model, qp, d / "qdq.onnx", float_onnx=d / "float.onnx")
    return dict(model=model, qp=qp, dir=d)


@pytest.fixture
def rt(bundle):
    return DeviceRuntime(bundle["dir"] / "qdq.onnx", threads=1)


def _snapshot(rt):
    return rt.model.SerializeToString(), rt.logits(ids(7, (2, 16))), rt.qparams


def test_patch_equals_fresh_export(bundle, rt, tmp_path):
    model, qp = bundle["model"], bundle["qp"]
    paths = list(float_linears(model))
    changed = {}
    for path in paths[:3]:  # q/k/v of layer 0: their int32 biases follow s_x
        p = qp.points[f"{path}:input"]
        changed[f"{path}:input"] = PointParams(p.spec, p.scale * np.float32(1.37), p.zero_point)
    p = qp.points[f"{paths[4]}:weight"]  # a weight scale: its integer weight is re-quantized
    changed[f"{paths[4]}:weight"] = PointParams(p.spec, p.scale * np.float32(1.1), p.zero_point)
    qp2 = qp.with_points(changed, version=qp.version + 1)
    partial = copy.copy(qp2)
    partial.points = changed  # a patch may carry only the changed points
    timing = rt.patch(partial)
    print(f"\npatch: {timing}")
    assert timing["changed"] > 0 and rt.qparams.version == qp.version + 1
    export_qdq(model, qp2, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    re = onnx.load(tmp_path / "re.onnx")
    assert {t.name: t.SerializeToString() for t in rt.model.graph.initializer} == \
        {t.name: t.SerializeToString() for t in re.graph.initializer}
    x = ids(3)
    fresh = ort_session(re).run(["logits"], {"input_ids": x})[0]
    assert np.array_equal(rt.logits(x), fresh)  # bit for bit


def test_refused_patch_changes_nothing(bundle, rt):
    qp = bundle["qp"]
    key = next(k for k in qp.points if k.endswith(":input"))
    p = qp.points[key]
    bad = {
        "unknown": qp.with_points({"model.nope.q_proj:input": p}),
        "NaN": qp.with_points({key: PointParams(p.spec, np.float32(np.nan), p.zero_point)}),
        "negative": qp.with_points({key: PointParams(p.spec, -p.scale, p.zero_point)}),
    }
    rt.patch(qp.with_points({}, version=5))
    before = _snapshot(rt)
    bad["older"] = qp.with_points({key: PointParams(p.spec, p.scale * 2, p.zero_point)}, version=4)
    for what, q in bad.items():
        if what != "older":
            q.version = 6
        with pytest.raises(PatchRefused, match="refused") as e:
            rt.patch(q)
        print(f"\n{what}: {e.value}")
        after = _snapshot(rt)
        assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2] is before[2]


def test_statistics_and_scout_match_torch(bundle, rt):
    model, qp = bundle["model"], bundle["qp"]
    data = ids(11)
    batches = [torch.from_numpy(data[i:i + 4]) for i in range(0, len(data), 4)]
    m = copy.deepcopy(model)
    quantize_(m)
    set_mode(m, "float")
    t0 = time.perf_counter()
    ranges_t = scout_ranges(m, batches)
    grids = grids_for(ranges_t, bins=256)
    stats_t = collect_stats(m, batches, grids)
    torch_s = time.perf_counter() - t0
    amax_keys = sorted(grids)[:3]
    amax_t = absmax_per_channel(m, batches, amax_keys)
    ins = Instruction(round=1, job="stats", qparams=qp, grids=grids,
                      absmax={k: len(amax_t[k]) for k in amax_keys})
    t0 = time.perf_counter()
    reply, met = statistics(rt, ins, data, batch_size=4)  # builds the capture session
    cold_s = time.perf_counter() - t0
    reply2, met = statistics(rt, ins, data, batch_size=4)
    assert all(reply2.stats[k] == reply.stats[k] for k in grids)
    sc, met_s = scout(rt, Instruction(round=0, job="scout", qparams=qp, keys=tuple(grids)), data, 4)
    plain = ort_session(rt.float_onnx)
    t0 = time.perf_counter()
    for i in range(0, len(data), 4):
        plain.run(["logits"], {"input_ids": data[i:i + 4]})
    plain_s = time.perf_counter() - t0
    moved, total, worst_rel = 0, 0, 0.0
    for k, st in stats_t.items():
        so = reply.stats[k]
        assert so.grid == st.grid and so.n == st.n
        d = so.counts - st.counts
        moved += int(np.abs(d).sum()) // 2 + abs(so.below - st.below) + abs(so.above - st.above)
        total += st.n
        # a value moved by one bin leaves a +1/-1 pair in adjacent bins: cumulative diff stays in {-1,0,1}
        assert np.abs(np.cumsum(d)).max() <= 3, k
        for a, b in ((so.min, st.min), (so.max, st.max)):
            worst_rel = max(worst_rel, abs(a - b) / max(abs(b), 1e-12))
        # scouting equals the observed min/max (same float graph, same data), and torch's range
        assert sc.ranges[k] == (so.min, so.max) and sc.n[k] == so.n
    assert worst_rel <= 1e-5 and moved <= max(10, total * 1e-5)
    for k in amax_keys:
        np.testing.assert_allclose(reply.absmax[k], amax_t[k], rtol=1e-5)
    print(f"\nstats: {len(stats_t)} points, {total} values, {moved} moved by a bin, "
          f"max rel min/max diff {worst_rel:.2e}; stats job {met['wall_s']:.3f} s (first {cold_s:.3f} s) "
          f"(numpy peak {met['numpy_peak_mb']:.1f} MB, rss {met['max_rss_mb']:.0f} MB), scout "
          f"{met_s['wall_s']:.3f} s, plain float pass {plain_s:.3f} s, torch scout+stats {torch_s:.3f} s")


def test_evaluate_matches_torch_fake_quant(bundle, rt):
    model, qp = bundle["model"], bundle["qp"]
    data = ids(21)
    met = evaluate(rt, None, data, batch_size=4)
    tot_fq = tot_f = max_dlogit = 0.0
    for i in range(0, len(data), 4):
        x = torch.from_numpy(data[i:i + 4])
        lq, _ = fake_quant_reference(model, qp, x, integer=True)
        max_dlogit = max(max_dlogit, float(np.abs(rt.logits(x.numpy()) - lq).max()))
        tot_fq += nll_sum_and_count(lq, x)[0]
        with torch.no_grad():
            tot_f += nll_sum_and_count(model(input_ids=x, use_cache=False).logits, x)[0]
    ppl_fq, ppl_f = np.exp(tot_fq / met["tokens"]), np.exp(tot_f / met["tokens"])
    rel = abs(met["perplexity"] - ppl_fq) / ppl_fq
    qeffect = abs(ppl_fq - ppl_f) / ppl_f
    print(f"\nppl ORT {met['perplexity']:.4f}, torch fake-quant {ppl_fq:.4f}, float {ppl_f:.4f}: "
          f"|ORT - fq| {rel:.2e} rel, quantization moves it {qeffect:.2e}; eval {met['wall_s']:.3f} s")
    dnll = abs(met["nll_sum"] - tot_fq) / met["tokens"]
    print(f"max |logit ORT - fq| {max_dlogit:.2e}; mean NLL |ORT - fq| = {dnll:.2e} nats/token, float vs fq {abs(tot_f - tot_fq) / met['tokens']:.2e}")
    # ORT computes each Linear as torch's integer reference does (exact integer accumulation,
    # one float32 rescale) and agrees on Linear inputs within a few LSB (test_export); a stray
    # 1-LSB flip moves a logit by ~s_x * s_w * |W|, far below 1e-4 nats/token here.
    assert dnll <= 1e-4


def test_profiles(tmp_path):
    a, b = load_profile(ROOT / "configs/profiles/int8.toml"), load_profile(ROOT / "configs/profiles/mixed.toml")
    assert (a.activation_bits, b.activation_bits, b.weight_bits, b.weight_group_size) == (8, 8, 4, 64)
    assert b.int16_activations and not a.int16_activations
    assert a.weight_symmetric and not b.weight_symmetric   # the mixed profile's uint4 groups
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\nmemory_budget = 12\n')
    with pytest.raises(ConfigError, match="memory_budget"):
        load_profile(f)
    f.write_text('name = "x"\nactivation_bits = 16\n')
    with pytest.raises(ConfigError, match="int16_activations"):
        load_profile(f)


def test_tiny_budget_lowers_batch(bundle, rt):
    qp = bundle["qp"]
    data = ids(31)
    grids = {k: Grid.snap(-8, 8, 64) for k in rt.activation_keys()}
    ins = Instruction(round=1, job="stats", qparams=qp, grids=grids)
    full, m_full = statistics(rt, ins, data, batch_size=8)
    widths = exposed_widths(rt, list(grids))
    one = 32 * sum(widths) * 4 / 2**20  # MB of one sequence
    small = DeviceProfile(name="small", memory_mb=2.5 * one)
    low, m_low = statistics(rt, ins, data, batch_size=8, profile=small)
    assert m_full["batch_size"] == 8 and m_low["batch_size"] == 2
    for k in grids:  # merging is exact; per-row float results do not depend on the batch here
        assert low.stats[k] == full.stats[k]
    with pytest.raises(MemoryBudgetError, match="budget"):
        statistics(rt, ins, data, profile=DeviceProfile(name="tiny", memory_mb=0.5 * one))
    assert plan_batch(8, 32, widths, None) == 8


def test_smoothing_patch_and_capture(bundle, tmp_path):
    """SmoothQuant factors: patching new ones re-quantizes that Linear's weight exactly as a fresh
    export does, and the capture sees the smoothed input x / m, as QuantLinear's capture does."""
    model, qp = bundle["model"], bundle["qp"]
    path = next(p for p in float_linears(model) if p.endswith("mlp.down_proj"))
    rng = np.random.default_rng(0)
    m1 = rng.uniform(0.5, 2.0, 128).astype(np.float32)
    qp1 = copy.copy(qp)
    qp1.smoothing = {path: m1}
    save_device_bundle(model, qp1, tmp_path / "s.onnx", float_onnx=bundle["dir"] / "float.onnx")
    rt = DeviceRuntime(tmp_path / "s.onnx")
    qp2 = copy.copy(qp1)
    qp2.smoothing, qp2.version = {path: rng.uniform(0.5, 2.0, 128).astype(np.float32)}, 1
    t = rt.patch(qp2)
    assert t["changed"] >= 2  # the factors and the integer weight
    export_qdq(model, qp2, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    re = onnx.load(tmp_path / "re.onnx")
    assert {t.name: t.SerializeToString() for t in rt.model.graph.initializer} == \
        {t.name: t.SerializeToString() for t in re.graph.initializer}
    x = ids(5, (4, 32))
    assert np.array_equal(rt.logits(x), ort_session(re).run(["logits"], {"input_ids": x})[0])
    key = f"{path}:input"
    got = rt.float_activations(x, [key])[key]
    tm = copy.deepcopy(model)
    quantize_(tm)
    set_mode(tm, "float")
    tm.get_submodule(path).set_smooth(qp2.smoothing[path])
    ref = absmax_per_channel(tm, [torch.from_numpy(x)], [key])[key]
    np.testing.assert_allclose(np.abs(got).reshape(-1, 128).max(0), ref, rtol=1e-5)
    assert rt.float_activations(x, []) == {}        # no point asked: no graph run (ORT refuses an empty one)


def test_a_rotated_static_input_is_captured_and_patched_as_the_instrument_has_it(bundle, tmp_path):
    """``QuantConfig.rotate``: the device's statistics see ``(x / m) R`` (what the point
    quantizes, what the instrument's capture sees), its scouting the input's own channels (x / m,
    unrotated: SmoothQuant's abs-max); new factors patch ``(W * m) R``'s integer weight in place,
    the same bits as a fresh export, and a QParams that would rotate other Linears is refused."""
    from quant.instrument import QuantConfig, capture_inputs, get_qparams, set_qparams
    from quant.qparams import QParams, rotated_linears
    from quant.rotation import rotate

    model = bundle["model"]
    qkv = sorted(p for p in float_linears(model) if p.endswith(("q_proj", "k_proj", "v_proj")))
    tm = copy.deepcopy(model)
    quantize_(tm, QuantConfig(rotate=["*_proj"], per_token_rotation=32))
    x = ids(5, (4, 32))
    ranges = {}
    with capture_inputs(tm, lambda k, a: ranges.__setitem__(k, (a.min().item(), a.max().item()))), torch.no_grad():
        tm(input_ids=torch.from_numpy(x))
    act = bundle["qp"].points[f"{qkv[0]}:input"].spec
    qp = get_qparams(tm).with_points({k: PointParams(act, *range_to_qparams(*r, act)) for k, r in ranges.items()})
    assert set(qkv) <= set(rotated_linears(qp)) and "lm_head" not in rotated_linears(qp)
    qp = QParams(qp.points, qp.model, 0, {qkv[0]: np.ones(64, np.float32)}, qp.meta)    # the factors' Div
    save_device_bundle(model, qp, tmp_path / "r.onnx", float_onnx=bundle["dir"] / "float.onnx")
    rt = DeviceRuntime(tmp_path / "r.onnx")
    m = np.random.default_rng(1).uniform(0.5, 2.0, 64).astype(np.float32)
    qp2 = QParams(dict(qp.points), qp.model, 1, {qkv[0]: m}, dict(qp.meta))
    assert rt.patch(qp2)["changed"] >= 2   # the factors and the rotated integer weight
    export_qdq(model, qp2, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    assert {t.name: t.SerializeToString() for t in rt.model.graph.initializer} == \
        {t.name: t.SerializeToString() for t in onnx.load(tmp_path / "re.onnx").graph.initializer}
    key = f"{qkv[0]}:input"
    set_qparams(tm, qp2)
    set_mode(tm, "float")
    seen = {}
    with capture_inputs(tm, lambda k, a: seen.__setitem__(k, a.numpy().copy()), [key]), torch.no_grad():
        tm(input_ids=torch.from_numpy(x))
    got = rt.float_activations(x, [key])[key]
    np.testing.assert_allclose(got, seen[key], rtol=1e-5, atol=1e-6)
    own = rt.float_activations(x, [key], rotated=False)[key]
    np.testing.assert_allclose(rotate(own, 32), got, rtol=1e-5, atol=1e-6)
    reply, _ = scout(rt, Instruction(2, "scout", qp2, keys=(key,), absmax={key: 64}), x)
    np.testing.assert_allclose(reply.channel_absmax[key], np.abs(own).reshape(-1, 64).max(0), rtol=1e-6)
    other = QParams(dict(qp2.points), qp2.model, 2, dict(qp2.smoothing), {**qp2.meta, "rotated": f'["{qkv[0]}"]'})
    with pytest.raises(PatchRefused, match="rotated inputs"):
        rt.patch(other)


def test_new_smoothing_without_weight_points_is_folded_on_the_device(bundle, tmp_path):
    """A round's instruction carries the smoothing factors but not the weight scales: the device
    derives the smoothed weight's min-max point from its own float weights -- the same bits the
    server (quant.smoothing) and torch's QuantLinear.set_smooth derive -- and ends up with the
    model a fresh export of the full QParams gives."""
    from quant.instrument import get_qparams
    from quant.qparams import QParams
    from quant.smoothing import smoothed_weight_point

    model, qp = bundle["model"], bundle["qp"]
    linears = float_linears(model)
    path = next(p for p in linears if p.endswith("self_attn.q_proj"))
    ones = QParams(qp.points, qp.model, 0, {path: np.ones(linears[path][0].shape[1], np.float32)}, qp.meta)
    save_device_bundle(model, ones, tmp_path / "s.onnx", float_onnx=bundle["dir"] / "float.onnx")
    rt = DeviceRuntime(tmp_path / "s.onnx")
    m = np.random.default_rng(3).uniform(0.2, 5.0, linears[path][0].shape[1]).astype(np.float32)
    rt.patch(QParams({}, qp.model, 1, {path: m}))                    # factors only: no points at all
    wk = f"{path}:weight"
    expect = smoothed_weight_point(linears[path][0], m, qp.points[wk].spec)
    got = rt.qparams.points[wk]
    assert not np.array_equal(got.scale, qp.points[wk].scale)
    np.testing.assert_array_equal(got.scale, expect.scale)
    np.testing.assert_array_equal(got.zero_point, expect.zero_point)
    tm = copy.deepcopy(model)
    quantize_(tm)
    tm.get_submodule(path).set_smooth(m)
    np.testing.assert_array_equal(get_qparams(tm).points[wk].scale, expect.scale)   # torch derives the same bits
    full = QParams({**qp.points, wk: expect}, qp.model, 1, {path: m})
    export_qdq(model, full, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    x = ids(6, (2, 32))
    np.testing.assert_array_equal(rt.logits(x), ort_session(tmp_path / "re.onnx").run(["logits"], {"input_ids": x})[0])
    with pytest.raises(PatchRefused, match="factors"):
        rt.patch(QParams({}, qp.model, 2, {path: m[:-1]}))


@pytest.mark.parametrize("rotation", [0, 64])
def test_a_per_token_input_takes_smoothing_factors_on_the_device(bundle, tmp_path, rotation):
    """A per-token Linear has a SmoothQuant Div too (``simulation.prepare.with_unit_smoothing``):
    factors sent without a weight point are folded on the device, the rewritten MatMulInteger reads
    the new integer weights, and the logits are a fresh export's bit for bit and the torch
    instrument's (x / m, then per token) within the kernels' rounding. With a rotation
    (``quant.rotation``) the device folds ``W * m`` then rotates, as the server does."""
    import json

    from quant.instrument import QuantConfig, get_qparams, set_qparams
    from quant.qparams import QParams, per_token_linears
    from quant.smoothing import smoothed_weight_point
    from simulation.prepare import with_unit_smoothing

    model, qp = bundle["model"], bundle["qp"]
    linears = float_linears(model)
    downs = sorted(p for p in linears if p.endswith("mlp.down_proj"))
    pt = QParams({k: v for k, v in qp.points.items() if k not in {f"{p}:input" for p in downs}}, qp.model, 0,
                 {}, {"per_token": json.dumps(downs), **({"per_token_rotation": str(rotation)} if rotation else {})})
    unit = with_unit_smoothing(pt, model)
    assert set(downs) <= set(unit.smoothing) and per_token_linears(unit) == downs
    save_device_bundle(model, unit, tmp_path / "s.onnx", float_onnx=bundle["dir"] / "float.onnx")
    rt = DeviceRuntime(tmp_path / "s.onnx")
    path = downs[0]
    m = np.random.default_rng(4).uniform(0.2, 5.0, linears[path][0].shape[1]).astype(np.float32)
    m[7] = 40.0                                                     # an outlier channel taken into the weight
    rt_unit = rt.logits(ids(8, (2, 32)))
    t = rt.patch(QParams({}, qp.model, 1, {path: m}))
    assert t["changed"] >= 2                                        # the factors and the integer weight
    wk = f"{path}:weight"
    expect = smoothed_weight_point(linears[path][0], m, qp.points[wk].spec, rotation)
    np.testing.assert_array_equal(rt.qparams.points[wk].scale, expect.scale)
    full = QParams({**pt.points, wk: expect}, qp.model, 1, {**unit.smoothing, path: m}, pt.meta)
    export_qdq(model, full, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    x = ids(8, (2, 32))
    got = rt.logits(x)
    re = ort_session(tmp_path / "re.onnx", weight_storage=rt.weight_storage)
    np.testing.assert_array_equal(got, re.run(["logits"], {"input_ids": x})[0])
    tm = copy.deepcopy(model)
    quantize_(tm, QuantConfig(per_token=["*.down_proj"], per_token_rotation=rotation))
    set_qparams(tm, QParams(full.points, get_qparams(tm).model, 1, full.smoothing, full.meta))
    set_mode(tm, "quant")
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(x), use_cache=False).logits.numpy()
        float_err = float(np.abs(model(input_ids=torch.from_numpy(x), use_cache=False).logits.numpy() - ref).max())
    # the same model on both sides: most logits agree to float rounding (a value at a rounding
    # tie of a static point may land one step apart, and attention carries that to the later
    # positions: about a third of them on this tiny model), while the factors move every logit
    diff, moved = np.abs(got - ref), np.abs(rt_unit - ref)
    print(f"\nper-token down_proj smoothed: max|ORT - instrument| {diff.max():.2e} (vs float {float_err:.2e}), "
          f"median {np.median(diff):.1e}; the unsmoothed model's median {np.median(moved):.1e}")
    assert np.median(diff) < 1e-6 < 1e-4 < np.median(moved)


def test_weight_storage_is_chosen_at_load_and_patches_stay_exact(bundle, tmp_path):
    """The runtime runs the int8 bundle on either grid (design.md section 3): the same logits bit
    for bit on this CPU when its u8 x s8 kernel is exact, a patch under uint8 storage equals a
    fresh export moved to uint8, and ``canonical_model`` gives back the exported int8 form."""
    from client.runtime import choose_weight_storage
    from quant.qdq import set_weight_storage

    model, qp = bundle["model"], bundle["qp"]
    rts = {f: DeviceRuntime(bundle["dir"] / "qdq.onnx", weight_storage=f) for f in ("int8", "uint8", "auto")}
    assert rts["auto"].weight_storage == choose_weight_storage()
    assert rts["uint8"].u8_weights and rts["uint8"].storage_moved == len(float_linears(model))
    assert rts["int8"].storage_moved == 0
    x = ids(3)
    if choose_weight_storage() == "int8":
        assert np.array_equal(rts["int8"].logits(x), rts["uint8"].logits(x))
    path = list(float_linears(model))[4]
    p = qp.points[f"{path}:weight"]
    q = qp.points[f"{path}:input"]
    qp2 = qp.with_points({f"{path}:weight": PointParams(p.spec, p.scale * np.float32(1.1), p.zero_point),
                          f"{path}:input": PointParams(q.spec, q.scale * np.float32(0.9), q.zero_point)},
                         version=qp.version + 1)
    rt = rts["uint8"]
    rt.patch(qp2)
    export_qdq(model, qp2, tmp_path / "re.onnx", float_onnx=bundle["dir"] / "float.onnx")
    re = onnx.load(tmp_path / "re.onnx")
    canon = {t.name: t.SerializeToString() for t in rt.canonical_model().graph.initializer}
    assert canon == {t.name: t.SerializeToString() for t in re.graph.initializer}
    set_weight_storage(re, True)
    assert {t.name: t.SerializeToString() for t in rt.model.graph.initializer} == \
        {t.name: t.SerializeToString() for t in re.graph.initializer}
    assert np.array_equal(rt.logits(x), ort_session(re, weight_storage=None).run(["logits"], {"input_ids": x})[0])

"""GPTQ in the protocol: the hessian job (the clients' second moments of the float Linear inputs,
``client.jobs.hessian``), its wire format and validation, the server's merge and GPTQ
(``server.rounds.gptq_qparams``), the codes the QParams carry (format, checks, what drops them) and
the device's graph built from them; end to end on a configs/gptq-smoke.toml run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quant.affine import dequantize, quantize
from quant.gptq import gptq_codes, gptq_weight, linear_hessian
from quant.qparams import (PointParams, QParams, diff_qparams, load_qparams, qparams_from_bytes,
                           qparams_problems, save_qparams)
from quant.rotation import rotate
from quant.spec import weight_spec
from quant.wire import (HessianReply, Instruction, WireError, decode_hessian_reply, decode_instruction,
                        encode_hessian_reply, encode_instruction, pack)
from server.aggregate import merge_hessians
from server.rounds import hessian_parts
from server.validate import Rejection, validate_hessian_reply

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _w4_point(w, group=8, signed=False):
    spec = weight_spec(4, group_size=group, symmetric=signed)     # signed: symmetric int4
    from quant.weight_ranges import weight_point
    return weight_point(w, spec)


def _coded(out=6, cols=16, signed=False):
    """A QParams with one 4-bit weight point and GPTQ codes for it (random moments)."""
    w = RNG.normal(size=(out, cols)).astype(np.float32)
    x = RNG.normal(size=(200, cols))
    codes, pt = gptq_codes(w, x.T @ x, _w4_point(w, signed=signed).spec)
    return QParams({"lin:weight": pt}, "m", 3, codes={"lin:weight": codes}), w, x


# ------------------------------------------------------------------ QParams.codes

@pytest.mark.parametrize("signed", [False, True])
def test_codes_round_trip_two_to_a_byte_and_drop_with_their_point(tmp_path, signed):
    qp, w, _ = _coded(signed=signed)
    c = qp.codes["lin:weight"]
    assert c.dtype == qp.points["lin:weight"].spec.numpy_dtype and c.shape == w.shape
    back = load_qparams(save_qparams(qp, tmp_path / "q.safetensors"))
    assert np.array_equal(back.codes["lin:weight"], c) and back.codes["lin:weight"].dtype == c.dtype
    from safetensors.numpy import load_file
    stored = load_file(tmp_path / "q.safetensors")["codes/lin:weight"]
    assert stored.dtype == np.uint8 and stored.shape == (w.shape[0], w.shape[1] // 2)     # half a byte a code
    # a new point without codes drops them; a diff names them
    pt = qp.points["lin:weight"]
    moved = qp.with_points({"lin:weight": PointParams(pt.spec, pt.scale * 2, pt.zero_point)})
    assert moved.codes == {} and qp.codes      # the original keeps its own
    assert {"key": "codes/lin:weight", "status": "changed"} in diff_qparams(qp, moved)


def test_codes_with_an_odd_width_and_8_bits_round_trip(tmp_path):
    w = RNG.normal(size=(3, 7)).astype(np.float32)
    spec4 = weight_spec(4, symmetric=False)          # uint4 per output channel
    pt = PointParams(spec4, *[np.asarray(a) for a in (np.full(3, 0.5, np.float32), np.full(3, 8, np.uint8))])
    codes = quantize(w, pt.scale, pt.zero_point, spec4)
    qp = QParams({"a:weight": pt}, codes={"a:weight": codes})
    assert np.array_equal(load_qparams(save_qparams(qp, tmp_path / "a.st")).codes["a:weight"], codes)
    spec8 = weight_spec(8)
    p8 = PointParams(spec8, np.full(3, 0.01, np.float32), np.zeros(3, np.int8))
    c8 = quantize(w, p8.scale, p8.zero_point, spec8)
    qp8 = QParams({"a:weight": p8}, codes={"a:weight": c8})
    assert np.array_equal(load_qparams(save_qparams(qp8, tmp_path / "b.st")).codes["a:weight"], c8)


def test_codes_that_cannot_be_the_weight_are_refused_with_their_key():
    qp, w, _ = _coded()
    pt, c = qp.points["lin:weight"], qp.codes["lin:weight"]
    with pytest.raises(ValueError, match="codes other:weight: not a weight point"):
        QParams({"lin:weight": pt}, codes={"other:weight": c}).validate()
    with pytest.raises(ValueError, match=r"values outside \[0, 15\]"):
        QParams({"lin:weight": pt}, codes={"lin:weight": c.astype(np.int16) + 16}).validate()
    with pytest.raises(ValueError, match="needs scales of shape"):
        QParams({"lin:weight": pt}, codes={"lin:weight": np.concatenate([c, c])}).validate()
    with pytest.raises(ValueError, match="2-D integer array"):
        QParams({"lin:weight": pt}, codes={"lin:weight": c.astype(np.float32)}).validate()
    assert qparams_problems(qp, in_features={"lin": w.shape[1] + 8}) == \
        [f"codes lin:weight: {w.shape[1]} columns for {w.shape[1] + 8} inputs"]
    assert qparams_problems(qp, in_features={"lin": w.shape[1]}) == []


def test_a_file_whose_codes_do_not_fit_is_refused_naming_it(tmp_path):
    qp, _, _ = _coded()
    raw = bytearray(save_qparams(qp, tmp_path / "q.st").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    meta = head["__metadata__"]
    meta["codes"] = json.dumps({"lin:weight": [6, 18]})     # not what the stored bytes hold
    body = json.dumps(head).encode()
    with pytest.raises(ValueError, match="bad.st: codes lin:weight: stored uint8"):
        qparams_from_bytes(len(body).to_bytes(8, "little") + body + bytes(raw[8 + n:]), name="bad.st")


# ------------------------------------------------------------------ the arithmetic

def test_gptq_codes_are_gptq_weight_on_its_grid():
    w = RNG.normal(size=(5, 32)).astype(np.float32)
    x = RNG.normal(size=(300, 32))
    spec = _w4_point(w, group=16).spec
    deq, pt = gptq_weight(w, x.T @ x, spec)
    codes, pt2 = gptq_codes(w, x.T @ x, spec)
    assert np.array_equal(pt.scale, pt2.scale) and np.array_equal(pt.zero_point, pt2.zero_point)
    assert np.array_equal(dequantize(codes, pt.scale, pt.zero_point, spec), deq)
    assert np.array_equal(quantize(deq, pt.scale, pt.zero_point, spec), codes)


@pytest.mark.parametrize("block", [0, 8, 32])
def test_a_linear_s_hessian_is_its_smoothed_rotated_input_s(block):
    """``H'`` of ``x' = (x / m) R`` from the float input's ``H`` alone: what the server derives."""
    x = RNG.normal(size=(400, 32)) * RNG.uniform(0.1, 30, 32)
    m = RNG.uniform(0.5, 4, 32).astype(np.float32)
    xr = (x / m.astype(np.float64))
    xr = rotate(xr, block).astype(np.float64) if block else xr
    np.testing.assert_allclose(linear_hessian(x.T @ x, m, block), xr.T @ xr, rtol=2e-5, atol=1e-6 * np.abs(xr.T @ xr).max())
    with pytest.raises(ValueError, match="3 smoothing factors for a 32-wide input"):
        linear_hessian(x.T @ x, m[:3], block)


# ------------------------------------------------------------------ wire, validation, merge

def _hessian_instruction(widths=None):
    widths = widths or {"a.q_proj:input": 4, "b.down_proj:input": 6}
    qp = QParams({}, "m", 2)
    return Instruction(5, "hessian", qp, keys=tuple(widths), hessian=widths)


def _reply(ins, tokens=40, seed=1):
    rng = np.random.default_rng(seed)
    sums = {}
    for k, c in ins.hessian.items():
        x = rng.normal(size=(tokens, c))
        sums[k] = x.T @ x
    return HessianReply(sums, tokens)


def test_an_instruction_carries_codes_exactly():
    qp, _, _ = _coded()
    wide = QParams({**qp.points, "b:weight": PointParams(weight_spec(8), np.full(2, 0.1, np.float32),
                                                         np.zeros(2, np.int8))}, "m", 3,
                   codes={**qp.codes, "b:weight": np.arange(-5, 5, dtype=np.int8).reshape(2, 5)})
    back = decode_instruction(*encode_instruction(Instruction(4, "eval", wide))).qparams
    assert sorted(back.codes) == ["b:weight", "lin:weight"]
    for k, c in wide.codes.items():
        assert np.array_equal(back.codes[k], c) and back.codes[k].dtype == c.dtype


def test_hessian_instruction_and_reply_round_trip():
    ins = _hessian_instruction()
    back = decode_instruction(*encode_instruction(ins))
    assert back.job == "hessian" and back.hessian == ins.hessian and back.keys == ins.keys
    assert back.digest == ins.digest
    r = _reply(ins)
    flat, header = encode_hessian_reply(r, ins)
    assert flat["float32"].size == 4 * 5 // 2 + 6 * 7 // 2          # upper triangles only
    got = validate_hessian_reply(flat, header, ins, 2)
    assert not isinstance(got, Rejection) and got.tokens == 40
    for k in ins.keys:
        np.testing.assert_allclose(got.sums[k], r.sums[k], rtol=1e-6)
        assert np.array_equal(got.sums[k], got.sums[k].T)
    with pytest.raises(ValueError, match="a Hessian instruction"):
        Instruction(5, "hessian", QParams({}, "m", 2), keys=("x:input",))
    with pytest.raises(ValueError, match="a Hessian instruction"):
        Instruction(5, "scout", QParams({}, "m", 2), keys=("x:input",), hessian={"x:input": 3})


def _tampered(ins, edit):
    """A reply whose upper triangles were changed by ``edit(sums_vector)`` after encoding."""
    flat, header = encode_hessian_reply(_reply(ins), ins)
    v = flat["float32"].copy()
    edit(v)
    return {**flat, "float32": v}, header


@pytest.mark.parametrize("edit,code", [
    (lambda v: v.__setitem__(3, np.nan), "nan"),
    (lambda v: v.__setitem__(0, -1.0), "negative"),        # the first diagonal entry
    (lambda v: v.__setitem__(1, 1e6), "inconsistent"),      # an entry beyond sqrt(H_00 H_11)
])
def test_a_hessian_reply_no_sum_of_x_xt_could_be_is_rejected(edit, code):
    ins = _hessian_instruction()
    flat, header = _tampered(ins, edit)
    r = validate_hessian_reply(flat, header, ins, 2)
    assert isinstance(r, Rejection) and r.code == code, r
    with pytest.raises(WireError):
        decode_hessian_reply(flat, header, ins)


def test_a_hessian_reply_with_too_few_tokens_or_the_wrong_size_is_rejected():
    ins = _hessian_instruction()
    flat, header = encode_hessian_reply(_reply(ins, tokens=3), ins)
    assert validate_hessian_reply(flat, header, ins, 4).code == "count_mismatch"     # 3 tokens, 4 examples
    flat, header = encode_hessian_reply(_reply(ins), ins)
    short, index = pack({"sums": flat["float32"][:-1], "tokens": flat["int64"]})
    assert validate_hessian_reply(short, {**header, "index": index}, ins, 2).code == "shape"
    with pytest.raises(ValueError, match="expects a \\(6, 6\\) second moment"):
        encode_hessian_reply(HessianReply({**_reply(ins).sums, "b.down_proj:input": np.eye(5)}, 40), ins)


def test_merged_hessians_pool_exactly_and_no_liar_steers_the_trimmed_merge():
    ins = _hessian_instruction({"k:input": 5})
    honest = [_reply(ins, tokens=30 + i, seed=i) for i in range(7)]
    pooled = sum(r.sums["k:input"] for r in honest) / sum(r.tokens for r in honest)
    np.testing.assert_allclose(merge_hessians(honest, "sum")["k:input"], pooled, rtol=1e-12)
    assert np.array_equal(merge_hessians(honest, "sum")["k:input"], merge_hessians(honest[::-1], "sum")["k:input"])
    liar = HessianReply({"k:input": 1e9 * np.outer(np.arange(1, 6), np.arange(1, 6))}, 1)
    means = [r.sums["k:input"] / r.tokens for r in honest]
    robust = merge_hessians([*honest, liar], "trimmed", 0.25)["k:input"]     # 8 clients: 2 dropped
    dropped = [i for i in range(7) if np.allclose(robust, np.mean([m for j, m in enumerate(means) if j != i], 0))]
    assert len(dropped) == 1, "the liar and one honest client are dropped, the other six averaged"
    assert np.linalg.eigvalsh(robust).min() >= 0                            # a mean of second moments
    assert np.allclose(merge_hessians(honest, "trimmed", 0.0)["k:input"], np.mean(means, 0))
    assert abs(merge_hessians([*honest, liar], "sum")["k:input"][4, 4]) > 1e6 * pooled[4, 4]    # the exact rule is not robust


def test_hessian_parts_cover_every_input_once_in_order_with_balanced_sizes():
    widths = {f"l{i:02d}.{n}:input": (1536 if n == "down_proj" else 576)
              for i in range(30) for n in ("down_proj", "gate_proj", "o_proj", "q_proj")}
    for parts in (1, 3, 8):
        cut = hessian_parts(widths, parts)
        assert len(cut) == parts and [k for p in cut for k in p] == sorted(widths)
        sizes = [sum(c * (c + 1) // 2 for c in p.values()) for p in cut]
        assert max(sizes) < 1.2 * sum(sizes) / parts + 1536 * 1537 // 2


def test_the_config_puts_the_hessian_rounds_last_and_with_gptq():
    from server.config import ServerConfig

    base = [{"job": "scout"}, {"job": "stats"}]
    ok = ServerConfig(schedule=[*base, {"job": "hessian", "repeat": 2}], gptq={"mixed": {}})
    assert ok.gptq["mixed"].damp == 0.01 and ok.digest() != ServerConfig(schedule=base).digest()
    with pytest.raises(ValueError, match="a hessian round needs gptq"):
        ServerConfig(schedule=[*base, {"job": "hessian"}])
    with pytest.raises(ValueError, match="no hessian round"):
        ServerConfig(schedule=base, gptq={"mixed": {}})
    ServerConfig(schedule=[*base, {"job": "hessian"}, {"job": "eval"}, {"job": "hessian"}], gptq={"mixed": {}})
    with pytest.raises(ValueError, match="a stats round after the first hessian round"):
        ServerConfig(schedule=[*base, {"job": "hessian"}, {"job": "eval"}, {"job": "stats"}], gptq={"mixed": {}})


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "run"
    proc = subprocess.run([sys.executable, "-c", "from simulation.cli import main; main()", "simulate", "--config",
                           str(ROOT / "configs" / "gptq-smoke.toml"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_a_run_rounds_every_4_bit_weight_by_gptq_and_carries_the_codes(gptq_run):
    from server.state import load_checkpoint

    final = load_qparams(gptq_run / "qparams" / "mixed.safetensors")
    four = sorted(k for k, p in final.points.items() if k.endswith(":weight") and p.spec.bits == 4)
    assert four and sorted(final.codes) == four
    lines = [json.loads(s) for s in (gptq_run / "metrics.jsonl").read_text().splitlines()]
    hess = [m for m in lines if m.get("job") == "hessian"]
    assert len(hess) == 2 and all(m["applied"] and not m["gptq"]["mixed"]["failed"] for m in hess)
    assert sum(m["gptq"]["mixed"]["rounded"] for m in hess) == len(four)
    assert sum(m["hessians"] for m in hess) == len(four)        # every input asked once, in one of the two rounds
    evals = [m for m in lines if m.get("job") == "eval"]
    assert evals[-1]["round"] > hess[-1]["round"] and evals[-1]["versions"]["mixed"] == final.version
    state = load_checkpoint(gptq_run / "checkpoint.safetensors")
    assert all(np.array_equal(state.qparams["mixed"].codes[k], final.codes[k]) for k in four)
    assert not load_qparams(gptq_run / "qparams" / "int8.safetensors").codes
    summary = json.loads((gptq_run / "summary.json").read_text())
    assert summary["profiles"]["mixed"]["federated_eval"][-1]["round"] == evals[-1]["round"]    # the table's row
    assert summary["profiles"]["mixed"]["artifacts"]["encodings"] is None
    assert summary["profiles"]["int8"]["artifacts"]["encodings"].endswith("encodings.json")
    assert not (gptq_run / "export" / "mixed" / "encodings.json").exists()
    # GPTQ's codes lie on their point's grid but are not the nearest rounding of the folded weight
    from client.runtime import load_float_linears, weights_path
    from quant.qparams import rotation_block
    from quant.smoothing import fold_weight

    linears = load_float_linears(weights_path(gptq_run / "device" / "mixed" / "model.onnx"))
    differ = 0
    for k in four:
        path, pt = k.rsplit(":", 1)[0], final.points[k]
        nearest = quantize(fold_weight(linears[path][0], final.smoothing.get(path), rotation_block(final, path)),
                           pt.scale, pt.zero_point, pt.spec)
        differ += int(np.count_nonzero(nearest != final.codes[k]))
        assert np.mean(nearest == final.codes[k]) > 0.5, k        # most codes are still the nearest
    assert differ > 0


def test_the_device_computes_with_the_codes_and_drops_them_with_their_point(gptq_run, tmp_path):
    """The runtime patched with the final QParams runs GPTQ's integer weights: the same logits, bit
    for bit, as a runtime without codes whose float weights lie on GPTQ's grid (``R^T Q / m``); a
    new point without codes makes the device round that weight itself again."""
    import shutil

    from client.runtime import DeviceRuntime, load_float_linears, save_float_linears, weights_path
    from quant.qparams import rotation_block

    final = load_qparams(gptq_run / "qparams" / "mixed.safetensors")
    src = gptq_run / "device" / "mixed"
    x = np.random.default_rng(3).integers(0, 200, (2, 16)).astype(np.int64)
    rt = DeviceRuntime(src / "model.onnx")
    rt.patch(final)
    assert sorted(rt.qparams.codes) == sorted(final.codes)
    coded = rt.logits(x)

    on_grid = tmp_path / "grid"
    shutil.copytree(src, on_grid)
    linears = dict(load_float_linears(weights_path(src / "model.onnx")).items())
    for key, c in final.codes.items():
        path, pt = key.rsplit(":", 1)[0], final.points[key]
        q = dequantize(c, pt.scale, pt.zero_point, pt.spec)
        b, m = rotation_block(final, path), final.smoothing.get(path)
        back = rotate(q, b, inverse=True) if b else q
        linears[path] = ((back / m if m is not None else back).astype(np.float32), linears[path][1])
    save_float_linears(linears, on_grid / "model.onnx")
    plain = QParams(final.points, final.model, final.version, final.smoothing, final.meta, final.importance)
    rt2 = DeviceRuntime(on_grid / "model.onnx")
    rt2.patch(plain)
    assert np.array_equal(coded, rt2.logits(x))
    rounded = DeviceRuntime(src / "model.onnx")        # the same points, each weight rounded to the nearest
    rounded.patch(plain)
    assert not rounded.qparams.codes and not np.array_equal(coded, rounded.logits(x))

    key = sorted(final.codes)[0]
    pt = final.points[key]
    moved = final.with_points({key: PointParams(pt.spec, pt.scale * 1.5, pt.zero_point)}, final.version + 1)
    rt.patch(moved)
    assert key not in rt.qparams.codes and len(rt.qparams.codes) == len(final.codes) - 1


def test_the_client_s_hessian_job_sums_the_float_input_s_own_channels(gptq_run):
    from client.jobs import hessian
    from client.runtime import DeviceRuntime

    rt = DeviceRuntime(gptq_run / "device" / "mixed" / "model.onnx")
    rt.patch(load_qparams(gptq_run / "qparams" / "mixed.safetensors"))     # smoothed, rotated: the job ignores both
    keys = sorted(k for k in rt.capture.tensors if k.endswith("down_proj:input"))[:2]
    widths = rt.activation_widths()
    ins = Instruction(9, "hessian", QParams({}, rt.qparams.model, rt.qparams.version), keys=tuple(keys),
                      hessian={k: widths[k] for k in keys})
    x = np.random.default_rng(4).integers(0, 200, (5, 16)).astype(np.int64)
    reply, metrics = hessian(rt, ins, x, batch_size=2)
    assert reply.tokens == x.size and metrics["batch_size"] == 2
    raw = rt.capture.run(x, keys)
    for k in keys:
        a = raw[k].reshape(-1, raw[k].shape[-1]).astype(np.float64)
        np.testing.assert_allclose(reply.sums[k], a.T @ a, rtol=1e-10)


def test_a_hostile_hessian_round_never_raises_and_commits_what_a_device_loads(tmp_path):
    """Honest replies and hostile ones (garbage arrays, NaN, 1e38, a liar's huge moment with a huge
    token claim) through validation, the merge, GPTQ and the commit: nothing raises, the hostile
    payloads are rejected or outvoted, the committed QParams pass the device's own check and their
    next instruction decodes; the liar moves the codes less than the exact rule lets it."""
    from server.config import ServerConfig
    from server.rounds import Accepted, apply_round, instructions_for
    from server.state import initial_state, load_checkpoint, save_checkpoint

    rng = np.random.default_rng(7)
    weights = {f"l{i}": rng.normal(size=(6, 16)).astype(np.float32) for i in range(3)}
    qp = QParams({f"{p}:weight": _w4_point(w) for p, w in weights.items()}, "m", 0)
    cfg = {"schedule": [{"job": "hessian", "min_replies": 3}], "gptq": {"p": {}}}
    state = initial_state({"p": qp}, "d")
    mix = rng.normal(size=(16, 16))
    xs = [rng.normal(size=(64, 16)) @ mix for _ in range(12)]
    v = rng.normal(size=16)

    def run(rule, liar=True):
        config = ServerConfig(**cfg, stats_rule=rule)
        ins = instructions_for(state, 1, config.schedule[0], config, weights)["p"]
        accepted, rejected = [], []
        for c, x in enumerate(xs):
            flat, header = encode_hessian_reply(HessianReply({k: x.T @ x for k in ins.keys}, 64), ins)
            if c == 0 and liar:     # a moment of one direction, claiming a million tokens
                flat, header = encode_hessian_reply(HessianReply({k: 1e10 * np.outer(v, v) for k in ins.keys},
                                                                 10**6), ins)
            elif c == 1:
                flat = {**flat, "float32": np.full_like(flat["float32"], np.nan)}
            elif c == 2:
                flat = {**flat, "float32": np.full_like(flat["float32"], 1e38)}
            elif c == 3:
                flat = {"float32": rng.normal(size=7).astype(np.float32)}
            r = validate_hessian_reply(flat, header, ins, 2)
            if isinstance(r, Rejection):
                rejected.append(r)
            else:
                accepted.append(Accepted(f"c{c}", 2, r))
        new, metrics = apply_round(state, 1, config.schedule[0], {"p": accepted}, rejected, config, weights)
        return new, metrics, rejected

    new, metrics, rejected = run("trimmed")
    assert [r.code for r in rejected] == ["nan", "value_range", "shape"]     # 1e38 everywhere: a mean square beyond 2^120
    assert metrics["applied"] and metrics["gptq"]["p"]["rounded"] == 3
    committed = new.qparams["p"]
    assert qparams_problems(committed, qp, {p: 16 for p in weights}) == [] and len(committed.codes) == 3
    assert decode_instruction(*encode_instruction(Instruction(2, "eval", committed))).qparams.codes.keys() \
        == committed.codes.keys()
    save_checkpoint(new, tmp_path / "c.safetensors")
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert all(np.array_equal(back.qparams["p"].codes[k], c) for k, c in committed.codes.items())
    honest = run("sum", liar=False)[0].qparams["p"].codes     # the honest clients' pooled moments

    def off(codes):
        return sum(int(np.count_nonzero(codes[k] != honest[k])) for k in honest)
    assert off(committed.codes) < off(run("sum")[0].qparams["p"].codes)    # the exact rule pools the liar's tokens


def test_a_hessian_instruction_carries_no_points_or_codes_and_an_eval_instruction_all():
    """Once a hessian round has committed codes, the next hessian instruction still carries only the
    model's fingerprint and version (its job reads the float graph), the evaluation's the codes."""
    from server.config import ServerConfig
    from server.rounds import Accepted, apply_round, instructions_for
    from server.state import initial_state

    rng = np.random.default_rng(8)
    weights = {f"l{i}": rng.normal(size=(6, 16)).astype(np.float32) for i in range(4)}
    qp = QParams({f"{p}:weight": _w4_point(w) for p, w in weights.items()}, "m", 0)
    config = ServerConfig(schedule=[{"job": "hessian", "repeat": 2, "min_replies": 1}, {"job": "eval"}],
                          gptq={"p": {}}, stats_rule="sum")
    state = initial_state({"p": qp}, "d")
    rounds = [r for r, _ in config.rounds()]
    ins = instructions_for(state, rounds[0], config.schedule[0], config, weights)["p"]
    x = rng.normal(size=(64, 16))
    reply = HessianReply({k: x.T @ x for k in ins.keys}, 64)
    state, metrics = apply_round(state, rounds[0], config.schedule[0], {"p": [Accepted("c", 1, reply)]}, [], config,
                                 weights)
    assert metrics["applied"] and state.qparams["p"].codes
    second = instructions_for(state, rounds[1], config.schedule[0], config, weights)["p"]
    assert second.job == "hessian" and not second.qparams.points and not second.qparams.codes
    assert (second.qparams.model, second.qparams.version) == ("m", state.qparams["p"].version)
    assert set(second.keys).isdisjoint(ins.keys)        # the other part of the inputs
    back = decode_instruction(*encode_instruction(second))
    assert back.hessian == second.hessian and not back.qparams.points
    ev = instructions_for(state, rounds[2], config.schedule[1], config, weights)["p"]
    assert ev.qparams.codes.keys() == state.qparams["p"].codes.keys()

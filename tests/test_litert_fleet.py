"""LiteRT phones in the fleet (docs/litert.md): a device profile with ``runtime = "litert"`` whose
nodes run the scouting, statistics and evaluation jobs in the LiteRT interpreter, beside ONNX
Runtime phones, and whose statistics the server sums with theirs at the same keys.

The tests that convert or run a model need the fedquant[litert] extra and are skipped without it;
the refusals (a config or a node asking for LiteRT where it is missing, profiles LiteRT cannot
run) are checked in every environment.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import app as capp
from client.profiles import DeviceProfile, load_profile
from quant.tflite import EXTRA_HINT, missing_litert

ROOT = Path(__file__).resolve().parent.parent
LITERT_SMOKE = ROOT / "configs" / "litert-smoke.toml"
needs_litert = pytest.mark.skipif(bool(missing_litert()), reason="the LiteRT interpreter and converter are in the "
                                  "optional fedquant[litert] extra (pip install -e '.[litert]', README 'LiteRT')")


@pytest.fixture(autouse=True)
def fresh_caches():
    capp.clear_caches()
    yield
    capp.clear_caches()


def _env():
    import os

    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


# ------------------------------------------------------------------ refusals (any environment)

def test_a_litert_profile_takes_only_what_the_tflite_export_carries():
    p = load_profile(ROOT / "configs" / "profiles" / "int8-litert.toml")
    assert p.runtime == "litert" and p.activation_bits == 8 and p.weight_bits == 8
    assert DeviceProfile(name="x").runtime == "onnxruntime"        # old profile.json files: ONNX Runtime
    for bad, what in ((dict(weight_bits=4), "weight_bits = 8"), (dict(weight_group_size=32), "weight_group_size"),
                      (dict(activation_bits=16, activation_signed=True, int16_activations=True), "activation_bits = 8"),
                      (dict(weight_symmetric=False), "weight_symmetric")):
        with pytest.raises(ValueError, match=what):
            DeviceProfile(name="x", runtime="litert", **bad)
    with pytest.raises(ValueError):
        DeviceProfile(name="x", runtime="tflite-gpu")


def test_a_smoothed_litert_profile_or_an_unsupported_override_is_a_config_error(tmp_path):
    from quant.configfile import ConfigError
    from simulation.prepare import load_simulation_config

    text = LITERT_SMOKE.read_text()
    bad = tmp_path / "smoothed.toml"
    bad.write_text(text.replace("[server]\n", "[server]\nsmoothing = { alpha = 0.8 }\n", 1))
    with pytest.raises((ConfigError, ValueError), match="skip_profiles"):
        load_simulation_config(bad)
    ok = tmp_path / "skipped.toml"     # the ORT phones smoothed, the LiteRT ones not: accepted
    ok.write_text(text.replace("[server]\n", '[server]\nsmoothing = { alpha = 0.8, skip_profiles = ["int8-litert"] }\n', 1))
    if not missing_litert():
        assert load_simulation_config(ok).server.smoothing.alpha_for("int8-litert") is None
    bad.write_text(text.replace('profile = "int8-litert"\nshare = 1\n',
                                'profile = "int8-litert"\nshare = 1\noverrides = { "*.down_proj:weight" = '
                                '{ bits = 4, symmetric = true, granularity = "per_channel", axis = 0 } }\n'))
    with pytest.raises((ConfigError, ValueError), match="runs LiteRT"):
        load_simulation_config(bad)


def test_a_litert_fleet_without_the_extra_fails_before_any_work(tmp_path):
    """As a user runs it, in a process where the extra is not installed (an import finder placed
    first answers for its packages with a spec that has no files, as an absent package's lookup
    does): exit code 2, the message says how to install it, nothing is written."""
    code = ("import sys, importlib.machinery\n"
            "class Absent:\n"
            "    @staticmethod\n"
            "    def find_spec(name, path=None, target=None):\n"
            "        top = name.split('.')[0]\n"
            "        return importlib.machinery.ModuleSpec(name, None) if top in ('ai_edge_litert', 'litert_torch') else None\n"
            "sys.meta_path.insert(0, Absent)\n"
            "from simulation.cli import main\n"
            "main()\n")
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", code, "simulate", "--config", str(LITERT_SMOKE), "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = " ".join(proc.stderr.split())
    assert "int8-litert" in err and "pip install -e '.[litert]'" in err, err[-2000:]
    assert not out.exists()


def test_a_node_without_litert_refuses_its_hello_with_how_to_install_it(tmp_path, monkeypatch):
    """A LiteRT profile on a node that lacks the interpreter is not installed there: the hello is
    refused ``unknown_profile`` (the server keeps the node out of its roster), with the hint."""
    from flwr.app import ConfigRecord, RecordDict

    import client.litert_runtime as lr

    d = tmp_path / "device"
    (d / "int8-litert").mkdir(parents=True)
    (d / "int8-litert" / "profile.json").write_text(load_profile(ROOT / "configs/profiles/int8-litert.toml")
                                                     .model_dump_json())
    (d / "fleet.json").write_text(json.dumps({"format": "fedquant.fleet/1", "profiles": ["int8-litert"],
                                              "nodes": {"0": {"profile": "int8-litert", "data": "clients/0.npz"}}}))
    monkeypatch.setattr(lr, "litert_available", lambda: False)
    reply = capp.handle("query", RecordDict({"config": ConfigRecord({"fedquant": "hello"})}),
                        {"partition-id": 0}, {"device-dir": str(d)}, RecordDict())
    assert reply["error"]["code"] == "unknown_profile"
    assert EXTRA_HINT in reply["error"]["reason"] and "int8-litert" in reply["error"]["reason"]


# ------------------------------------------------------------------ the ClientApp on a LiteRT phone

VOCAB, T = 257, 24


def _ids(seed, n):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, T)).astype(np.int64)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """A device directory of a tiny Qwen2 (its q/k/v biases move with every patch): node 0 an
    ORT phone (int8), node 1 a LiteRT phone (int8-litert), the same data and starting QParams."""
    if missing_litert():
        pytest.skip("needs the fedquant[litert] extra")
    import torch

    from client import device
    from quant.export import export_float_onnx
    from quant.instrument import QuantConfig, fingerprint
    from quant.spec import activation_spec, weight_spec
    from simulation.models import tiny_qwen2
    from test_export import minmax_qparams

    d = tmp_path_factory.mktemp("litert-app")
    model = tiny_qwen2()
    export_float_onnx(model, d / "float.onnx")
    qp = minmax_qparams(model, torch.from_numpy(_ids(1, 4)))
    qp.model = fingerprint(model)
    names = ("int8", "int8-litert")
    profiles = {n: load_profile(ROOT / "configs" / "profiles" / f"{n}.toml") for n in names}
    cfg = QuantConfig(activation=activation_spec(8), weight=weight_spec(8))
    nodes = {pid: {"profile": n, "train": _ids(10, 5), "test": _ids(20, 2)} for pid, n in enumerate(names)}
    device.write_device_dir(d / "device", model=model, profiles=profiles, quant_configs={n: cfg for n in names},
                            qparams={n: qp for n in names}, float_onnx=d / "float.onnx", nodes=nodes)
    return dict(dir=d / "device", qp=qp, model=model)


def _send(dd, pid, message_type, content, state):
    return capp.handle(message_type, content, {"partition-id": pid}, {"device-dir": str(dd["dir"])}, state)


def _job(ins, profile, batch=4):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from quant.wire import encode_instruction

    flat, header = encode_instruction(ins)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in flat.items()}),
                       "config": ConfigRecord({"header": json.dumps(header), "profile": profile, "batch-size": batch})})


def _stats(reply, ins):
    from quant.wire import decode_stats_reply

    assert "error" not in reply, dict(reply["error"])
    return decode_stats_reply({k: v.numpy() for k, v in reply["arrays"].items()}, json.loads(reply["config"]["header"]), ins)


def _release(qp, version):
    """New input scales and zero points for q_proj (which has a bias) and down_proj."""
    from quant.qparams import PointParams, QParams

    points = {}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        p = qp.points[f"{path}:input"]
        points[f"{path}:input"] = PointParams(p.spec, np.float32(p.scale) * 1.5, np.asarray(p.zero_point) - 3)
    return QParams(points, qp.model, version)


@needs_litert
def test_litert_phone_answers_every_job_and_its_statistics_merge_with_an_ort_phones(mixed_dir):
    from flwr.app import ConfigRecord, RecordDict

    from client.litert_runtime import LiteRTDevice
    from client.runtime import DeviceRuntime
    from quant.stats import Grid, merge
    from quant.wire import Instruction, decode_scout_reply

    dd, qp = mixed_dir, mixed_dir["qp"]
    states = {0: RecordDict(), 1: RecordDict()}
    hello = _send(dd, 1, "query", RecordDict({"config": ConfigRecord({"fedquant": "hello"})}), states[1])
    assert hello["info"]["profile"] == "int8-litert" and hello["info"]["held-version"] == qp.version
    keys = sorted(k for k in qp.points if k.endswith(":input"))

    # scouting: (min, max) and abs-max per channel of the float activations, as the ORT phone's
    scout = Instruction(round=1, job="scout", qparams=qp.with_points({}), keys=tuple(keys), absmax={keys[0]: 64})
    got = {}
    for pid, prof in ((0, "int8"), (1, "int8-litert")):
        r = _send(dd, pid, "train", _job(scout, prof), states[pid])
        assert "error" not in r, dict(r["error"])
        got[pid] = decode_scout_reply({k: v.numpy() for k, v in r["arrays"].items()},
                                      json.loads(r["config"]["header"]), scout)
    assert isinstance(capp.get_runtime(str(dd["dir"]), "int8-litert"), LiteRTDevice)
    assert isinstance(capp.get_runtime(str(dd["dir"]), "int8"), DeviceRuntime)
    for k in keys:
        assert got[1].n[k] == got[0].n[k]
        np.testing.assert_allclose(got[1].ranges[k], got[0].ranges[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].absmax[keys[0]], got[0].absmax[keys[0]], rtol=1e-5, atol=1e-6)

    # statistics under a newer release: both phones patch it first, then sum at the same keys
    release = _release(qp, int(qp.version) + 1)
    ins = Instruction(round=2, job="stats", qparams=release, grids={k: Grid.snap(-8, 8, 64) for k in keys})
    mine = _stats(_send(dd, 1, "train", _job(ins, "int8-litert"), states[1]), ins)
    theirs = _stats(_send(dd, 0, "train", _job(ins, "int8"), states[0]), ins)
    assert states[1]["held"]["version"] == states[0]["held"]["version"] == release.version
    for k in keys:
        a, b = mine.stats[k], theirs.stats[k]
        assert a.n == b.n > 0 and a.grid == b.grid
        assert np.abs(np.cumsum(a.counts - b.counts)).max() <= 3, k   # a value or two one bin over
        assert a.min == pytest.approx(b.min, rel=1e-5, abs=1e-6) and a.max == pytest.approx(b.max, rel=1e-5, abs=1e-6)
        assert merge(a, b).n == 2 * a.n

    # evaluation in the interpreter, on the patched .tflite: what the ORT phone scores
    ev = Instruction(round=3, job="eval", qparams=release)
    lite = _send(dd, 1, "evaluate", _job(ev, "int8-litert"), states[1])["metrics"]
    ort = _send(dd, 0, "evaluate", _job(ev, "int8"), states[0])["metrics"]
    assert lite["version"] == release.version and lite["tokens"] == ort["tokens"] == 2 * (T - 1)
    assert lite["nll_sum"] == pytest.approx(ort["nll_sum"], rel=1e-5)
    held = _send(dd, 1, "evaluate", _job(Instruction(round=3, job="eval", qparams=qp.with_points({}, version=release.version)),
                                         "int8-litert"), states[1])["metrics"]
    assert abs(held["nll_sum"] - lite["nll_sum"]) > 1e-6 * lite["nll_sum"]     # the release did something


@needs_litert
def test_litert_phone_refuses_what_its_tflite_cannot_take_and_changes_nothing(mixed_dir):
    from flwr.app import RecordDict

    from quant.qparams import QParams
    from quant.wire import Instruction

    dd, qp = mixed_dir, mixed_dir["qp"]
    state = RecordDict()
    keys = sorted(k for k in qp.points if k.endswith(":input"))
    path = keys[0].rsplit(":", 1)[0]
    width = int(mixed_dir["model"].get_submodule(path).weight.shape[1])
    movable = {k: qp.points[k] for k in keys}     # what a round sends: the activation points
    smoothed = QParams(movable, qp.model, int(qp.version) + 1, {path: np.full(width, 2.0, np.float32)})
    ev = Instruction(round=1, job="eval", qparams=smoothed)
    r = _send(dd, 1, "evaluate", _job(ev, "int8-litert"), state)
    assert r["error"]["code"] == "patch_refused" and "smoothing" in r["error"]["reason"]
    assert "held" not in state
    rt = capp.get_runtime(str(dd["dir"]), "int8-litert")
    assert rt.qparams.version == qp.version and not rt.qparams.smoothing
    p = qp.points[keys[0]]
    from quant.qparams import PointParams

    tiny = QParams({keys[0]: PointParams(p.spec, np.float32(1e-30), p.zero_point)}, qp.model, int(qp.version) + 1)
    r = _send(dd, 1, "evaluate", _job(Instruction(round=1, job="eval", qparams=tiny), "int8-litert"), state)
    assert r["error"]["code"] == "patch_refused" and "scales" in r["error"]["reason"]
    assert rt.qparams.version == qp.version and "held" not in state


# ------------------------------------------------------------------ a mixed fleet in the simulation

def _simulate(config: Path, out: Path):
    proc = subprocess.run([sys.executable, "-c", "from simulation.cli import main; main()", "simulate",
                           "--config", str(config), "--out", str(out), "--rounds", "3"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"fedquant simulate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@needs_litert
def test_a_mixed_fleets_statistics_equal_an_all_ort_fleets_and_evaluation_runs_in_litert(tmp_path):
    """configs/litert-smoke.toml (3 ORT phones, 3 LiteRT phones; scouting, one statistics round of
    every client under the exact sum, one evaluation round) against the same fleet with the
    LiteRT profile's phones on ONNX Runtime (the same profile name, so the same data and
    sampling). The summed statistics are equal up to the two runtimes' float rounding: the same
    value counts, below/above counts and grids, at most one value one bin over per point, min and
    max within 1e-5 (XNNPACK and MLAS sum the matmuls in different orders: measured 2.7e-7). The
    QParams calibrated from them agree within 1e-5. The LiteRT profile's evaluation round is the
    LiteRT interpreter's: its perplexity is what the interpreter gives, in this process, on those
    phones' test data with the round's QParams, and not what ONNX Runtime gives (2.6e-9 apart)."""
    from client.runtime import DeviceRuntime
    from quant.qparams import QParams
    from server.rounds import activation_keys
    from server.state import load_checkpoint

    profile = tmp_path / "int8-litert.toml"      # the same profile, on ONNX Runtime
    profile.write_text((ROOT / "configs/profiles/int8-litert.toml").read_text()
                       .replace('runtime = "litert"', 'runtime = "onnxruntime"'))
    all_ort = tmp_path / "all-ort.toml"
    all_ort.write_text(LITERT_SMOKE.read_text().replace('profile = "int8-litert"', f'profile = "{profile}"'))
    _simulate(LITERT_SMOKE, tmp_path / "mixed")
    _simulate(all_ort, tmp_path / "ort")
    mixed, ort = (load_checkpoint(tmp_path / n / "checkpoint.safetensors") for n in ("mixed", "ort"))

    assert set(mixed.sums) == set(ort.sums) and len(mixed.sums) >= 10
    moved = 0
    for k, a in mixed.sums.items():
        b = ort.sums[k]
        assert a.grid == b.grid and a.n == b.n > 0 and (a.below, a.above) == (b.below, b.above), k
        cdf = np.abs(np.cumsum(np.asarray(a.counts, np.int64) - np.asarray(b.counts, np.int64)))
        assert cdf.max() <= 1, k
        moved += int(cdf.max())
        assert a.min == pytest.approx(b.min, rel=1e-5) and a.max == pytest.approx(b.max, rel=1e-5), k
    assert moved <= len(mixed.sums) // 3        # most points' histograms are identical
    for prof in ("int8", "int8-litert"):
        qa, qb = mixed.qparams[prof], ort.qparams[prof]
        assert qa.version == qb.version == 1 and set(qa.points) == set(qb.points)
        for k in qa.points:
            np.testing.assert_allclose(qa.points[k].scale, qb.points[k].scale, rtol=1e-5, err_msg=k)
            np.testing.assert_array_equal(qa.points[k].zero_point, qb.points[k].zero_point, err_msg=k)

    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("mixed", "ort")}
    assert [r["job"] for r in rows["mixed"]] == ["scout", "stats", "eval"]
    assert all(r["rejections"] == {} for r in rows["mixed"])
    got = rows["mixed"][2]["eval"]["int8-litert"]
    want = rows["ort"][2]["eval"]["int8-litert"]
    assert got["replies"] == want["replies"] == 3 and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)

    d = tmp_path / "mixed" / "device"
    fleet = json.loads((d / "fleet.json").read_text())
    assert fleet["float-tflite"] == "float.tflite" and (d / "int8-litert" / "model.tflite").is_file()
    assert not (d / "int8" / "model.tflite").exists()
    full = mixed.qparams["int8-litert"]
    sent = QParams({k: full.points[k] for k in activation_keys(full)}, full.model, full.version)
    lite, onnx = capp.get_runtime(str(d), "int8-litert"), DeviceRuntime(d / "int8-litert" / "model.onnx")
    lite.patch(sent)
    onnx.patch(sent)
    sums = {"lite": [], "onnx": []}
    tokens = 0
    for pid, node in fleet["nodes"].items():
        if node["profile"] == "int8-litert":
            test = np.load(d / node["data"])["test"]
            for name, rt in (("lite", lite), ("onnx", onnx)):
                sums[name].append(rt.evaluate(test)[0])
            tokens += test.shape[0] * (test.shape[1] - 1)
    assert tokens == got["tokens"]
    ppl = {name: math.exp(math.fsum(v) / tokens) for name, v in sums.items()}
    assert got["perplexity"] == pytest.approx(ppl["lite"], rel=1e-12)
    assert got["perplexity"] != pytest.approx(ppl["onnx"], rel=1e-12)   # ORT's arithmetic is not what ran

"""The ClientApp (client/app.py) over a device directory (client/device.py): hello, the four jobs
through ``handle``, error codes with nothing patched, the per-process model cache, and the
decorated app called with a real Flower Message and Context. One tiny Qwen2, one device directory
of 3 nodes and 2 profiles (uint8 activations; int16 activations), built once (the slow step)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client import app as capp
from client import device, jobs
from client.profiles import DeviceProfile, load_profile
from quant.export import export_float_onnx
from quant.instrument import QuantConfig, fingerprint
from quant.spec import activation_spec, weight_spec
from quant.stats import Grid
from quant.wire import (Instruction, decode_stats_reply, encode_instruction, encode_stats_reply)
from server.validate import (Rejection, validate_lsq_reply, validate_scout_reply, validate_stats_reply)
from simulation.models import tiny_qwen2
from test_export import minmax_qparams

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 257, 24
NODES = {"0": ("int8", 6, 3), "1": ("int8", 4, 2), "2": ("a16", 5, 3)}  # profile, train N, test N


def ids(seed, n):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, T)).astype(np.int64)


@pytest.fixture(scope="module")
def dd(tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    model = tiny_qwen2()
    t0 = time.perf_counter()
    export_float_onnx(model, d / "src-float.onnx")
    calib = torch.from_numpy(ids(1, 4))
    profiles = {"int8": load_profile(ROOT / "configs/profiles/int8.toml"),
                "a16": DeviceProfile(name="a16", activation_bits=16, activation_signed=True,
                                     int16_activations=True, memory_mb=64)}
    configs = {"int8": QuantConfig(activation=activation_spec(8), weight=weight_spec(8)),
               "a16": QuantConfig(activation=activation_spec(16), weight=weight_spec(8))}
    qps = {"int8": minmax_qparams(model, calib), "a16": minmax_qparams(model, calib, activation_spec(16))}
    for qp in qps.values():  # the server's QParams name the model (learn_ranges loads them strictly)
        qp.model = fingerprint(model)
    nodes = {int(pid): {"profile": p, "train": ids(10 + int(pid), n), "test": ids(20 + int(pid), m)}
             for pid, (p, n, m) in NODES.items()}
    out = d / "device"
    device.write_device_dir(out, model=model, profiles=profiles, quant_configs=configs, qparams=qps,
                            float_onnx=d / "src-float.onnx", nodes=nodes)
    print(f"\ndevice dir built in {time.perf_counter() - t0:.1f} s")
    return dict(dir=out, qp=qps, nodes=nodes, profiles=profiles, model=model)


@pytest.fixture(autouse=True)
def fresh_caches():
    capp.clear_caches()  # versions move forward within a test; each test starts from the install
    yield
    capp.clear_caches()


def run_cfg(dd):
    return {"device-dir": str(dd["dir"])}


def node_cfg(pid):
    return {"partition-id": int(pid), "num-partitions": len(NODES)}


def hello():
    return RecordDict({"config": ConfigRecord({"fedquant": "hello"})})


def job_content(ins, profile, batch=4, learn=None, tamper=None):
    flat, header = encode_instruction(ins)
    if tamper:
        flat, header = tamper(copy.deepcopy(flat), copy.deepcopy(header))
    cfg = {"header": json.dumps(header), "profile": profile, "batch-size": batch}
    if learn is not None:
        cfg["learn"] = json.dumps(learn)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in flat.items()}),
                       "config": ConfigRecord(cfg)})


def act_keys(qp):
    return sorted(k for k in qp.points if k.endswith(":input"))


def stats_ins(qp, version=None, bins=64):
    qp = qp if version is None else qp.with_points({}, version=version)
    keys = act_keys(qp)
    return Instruction(round=1, job="stats", qparams=qp, grids={k: Grid.snap(-8, 8, bins) for k in keys},
                       absmax={keys[0]: 64})


def payload(reply):
    assert "error" not in reply, dict(reply["error"])
    return {k: v.numpy() for k, v in reply["arrays"].items()}, json.loads(reply["config"]["header"])


def send(dd, pid, message_type, content, state):
    return capp.handle(message_type, content, node_cfg(pid), run_cfg(dd), state)


def test_device_dir_readers(dd):
    fleet = device.read_fleet(dd["dir"])
    assert fleet["profiles"] == ["a16", "int8"] and set(fleet["nodes"]) == set(NODES)
    for pid, (p, n, m) in NODES.items():
        assert fleet["nodes"][pid]["profile"] == p
        data = device.load_node_data(dd["dir"], pid)
        assert data["train"].dtype == np.int64 and np.array_equal(data["train"], dd["nodes"][int(pid)]["train"])
        assert data["test"].shape == (m, T)
    assert device.load_device_profile(dd["dir"], "int8") == dd["profiles"]["int8"]
    assert device.load_quant_config(dd["dir"], "a16").activation.bits == 16
    # torch/ is the float model (a plain HF model with the same weights), never an instrumented one
    from transformers import AutoModelForCausalLM

    from quant.instrument import quant_points, quantize_

    loaded = AutoModelForCausalLM.from_pretrained(device.torch_model_dir(dd["dir"]))
    assert not quant_points(loaded) and fingerprint(loaded) == dd["qp"]["int8"].model
    ref = dd["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    inst = copy.deepcopy(dd["model"])
    quantize_(inst)
    with pytest.raises(ValueError, match="instrumented"):
        device.write_device_dir(dd["dir"].parent / "x", model=inst, profiles=dd["profiles"],
                                quant_configs={p: QuantConfig() for p in dd["profiles"]}, qparams=dd["qp"],
                                float_onnx=dd["dir"] / "float.onnx", nodes=dd["nodes"])
    assert not (dd["dir"].parent / "x").exists()  # checked before anything is written
    with pytest.raises(device.UnknownNode, match="no node '7'"):
        device.load_node_data(dd["dir"], 7)
    with pytest.raises(device.UnknownProfile, match="nope"):
        device.load_device_profile(dd["dir"], "nope")
    with pytest.raises(device.DeviceDirError, match="fleet.json: no such file"):
        device.read_fleet(dd["dir"] / "int8")


def test_hello(dd):
    for pid, (p, n, m) in NODES.items():
        r = send(dd, pid, "query", hello(), RecordDict())
        info = r["info"]
        assert (info["client-id"], info["profile"], info["train-examples"], info["test-examples"],
                info["held-version"]) == (pid, p, n, m, 0)
        assert r["metrics"]["num-examples"] == n
    # node_config wins: profile and data path set by an operator
    r = capp.handle("query", hello(), {"data-path": "clients/1.npz", "profile": "int8"}, run_cfg(dd), RecordDict())
    assert r["info"]["client-id"] == "1" and r["info"]["train-examples"] == 4


def test_scout_stats_eval_round_trip(dd):
    for pid in ("0", "2"):
        p = NODES[pid][0]
        qp, state = dd["qp"][p], RecordDict()
        scout_ins = Instruction(round=0, job="scout", qparams=qp, keys=tuple(act_keys(qp)))
        r = send(dd, pid, "train", job_content(scout_ins, p), state)
        flat, header = payload(r)
        got = validate_scout_reply(flat, header, scout_ins, r["metrics"]["num-examples"])
        assert not isinstance(got, Rejection), got
        assert r["metrics"]["num-examples"] == NODES[pid][1] and all(n > 0 for n in got.n.values())
        # per Linear input, the count is sequences x tokens x width
        k = next(k for k in got.n if k.endswith("mlp.down_proj:input"))
        assert got.n[k] == NODES[pid][1] * T * 128

        ins = stats_ins(qp)
        r = send(dd, pid, "train", job_content(ins, p), state)
        flat, header = payload(r)
        st = validate_stats_reply(flat, header, ins, r["metrics"]["num-examples"])
        assert not isinstance(st, Rejection), st
        assert st.stats[k].n == got.n[k] and (st.stats[k].min, st.stats[k].max) == got.ranges[k]

        ev = Instruction(round=2, job="eval", qparams=qp.with_points({}, version=3))
        r = send(dd, pid, "evaluate", job_content(ev, p), state)
        assert "error" not in r, dict(r["error"])
        m = r["metrics"]
        assert m["num-examples"] == NODES[pid][2] and m["version"] == 3 and m["tokens"] == NODES[pid][2] * (T - 1)
        assert math.isclose(m["perplexity"], math.exp(m["nll_sum"] / m["tokens"]), rel_tol=1e-9)
        assert 1 < m["perplexity"] < 3 * VOCAB  # a random-init model: around the vocabulary size
        assert state["held"]["version"] == 3 and "arrays" not in r


def test_a_runtime_behind_the_nodes_held_version_is_patched(dd):
    """A node that accepted version 2 in one process, then served by another whose runtime is still
    at the installed version (another simulation actor, or a restart), gets the same QParams in: its
    held version alone would skip the patch and take statistics on the old ones."""
    qp = dd["qp"]["int8"]
    state = RecordDict()
    first = send(dd, "0", "train", job_content(stats_ins(qp, version=2), "int8"), state)
    assert state["held"]["version"] == 2
    capp.clear_caches()                                   # the next job runs in another process
    rt = capp.get_runtime(str(dd["dir"].resolve()), "int8")
    assert rt.qparams.version < 2
    again = send(dd, "0", "train", job_content(stats_ins(qp, version=2), "int8"), state)
    assert rt.qparams.version == 2 and "patch_s" in again["metrics"]
    assert payload(again)[1] == payload(first)[1]


def test_stats_through_app_equals_direct(dd):
    ins = stats_ins(dd["qp"]["int8"])
    r = send(dd, "0", "train", job_content(ins, "int8", batch=4), RecordDict())
    flat, header = payload(r)
    rt = capp.get_runtime(str(dd["dir"].resolve()), "int8")
    direct, _ = jobs.statistics(rt, ins, dd["nodes"][0]["train"], batch_size=4, profile=dd["profiles"]["int8"])
    flat_d, header_d = encode_stats_reply(direct, ins)
    assert header == header_d and flat.keys() == flat_d.keys()
    for k in flat:
        assert flat[k].dtype == flat_d[k].dtype and np.array_equal(flat[k], flat_d[k])
    got = decode_stats_reply(flat, header, ins)
    assert all(got.stats[k] == direct.stats[k] for k in ins.keys)


def test_lsq_job(dd):
    qp = dd["qp"]["int8"].with_points({}, version=1)
    keys = tuple(act_keys(qp)[:4])
    ins = Instruction(round=3, job="lsq", qparams=qp, keys=keys)
    state = RecordDict()
    r = send(dd, "1", "train", job_content(ins, "int8", batch=2, learn={"steps": 2}), state)
    flat, header = payload(r)
    got = validate_lsq_reply(flat, header, ins, r["metrics"]["num-examples"])
    assert not isinstance(got, Rejection), got
    assert set(got.delta_log_s) == set(keys) and any(np.any(v != 0) for v in got.delta_log_s.values())
    m = r["metrics"]
    assert (m["num-examples"], m["steps"], m["batch_size"], m["tokens"]) == (4, 2, 2, 2 * 2 * (T - 1))
    assert state["held"]["version"] == 1  # the newer global QParams were patched in first
    assert capp.get_runtime(str(dd["dir"].resolve()), "int8").qparams.version == 1
    bad = send(dd, "1", "train", job_content(ins, "int8", learn={"steps": -1}), RecordDict())
    assert bad["error"]["code"] == "bad_instruction" and "learn" in bad["error"]["reason"]


def test_lsq_job_on_the_runtime(dd):
    """learn.method = runtime: the same reply form, computed by client.learn_runtime on the device
    runtime; no torch model is built for it."""
    qp = dd["qp"]["int8"].with_points({}, version=1)
    keys = tuple(act_keys(qp))
    ins = Instruction(round=3, job="lsq", qparams=qp, keys=keys)
    state = RecordDict()
    r = send(dd, "1", "train", job_content(ins, "int8", batch=2, learn={"method": "runtime"}), state)
    flat, header = payload(r)
    got = validate_lsq_reply(flat, header, ins, r["metrics"]["num-examples"])
    assert not isinstance(got, Rejection), got
    assert set(got.delta_log_s) == set(keys) and any(np.any(v != 0) for v in got.delta_log_s.values())
    m = r["metrics"]
    assert m["num-examples"] == 4 and m["points"] == len(keys) and m["loss_after"] <= m["loss_before"]
    assert state["held"]["version"] == 1 and not capp._TORCH
    weight = next(k for k in qp.points if k.endswith(":weight"))
    bad = send(dd, "1", "train", job_content(Instruction(round=3, job="lsq", qparams=qp, keys=(weight,)), "int8",
                                             learn={"method": "runtime"}), RecordDict())
    assert bad["error"]["code"] == "bad_instruction" and "Linears" in bad["error"]["reason"]


def _tamper_grid(flat, header):
    e = next(e for e in header["index"] if e[0] == "grids/lo_hi")
    k = e[3][0]
    e[3] = [k - 1, 2]
    flat[e[1]] = np.delete(flat[e[1]], [e[2] + 2 * k - 2, e[2] + 2 * k - 1])
    return flat, header


def _tamper_scale(value):
    def f(flat, header):
        e = next(e for e in header["index"] if e[0] == "scale")
        flat[e[1]][e[2] + 1] = value
        return flat, header
    return f


def test_errors_change_nothing(dd):
    qp = dd["qp"]["int8"]
    rt = capp.get_runtime(str(dd["dir"].resolve()), "int8")
    state = RecordDict()
    # the node accepts version 5 first, so an older one is stale
    r = send(dd, "0", "evaluate", job_content(Instruction(0, "eval", qp.with_points({}, version=5)), "int8"), state)
    assert r["metrics"]["version"] == 5 and state["held"]["version"] == 5
    ins6 = stats_ins(qp, version=6)
    other = dd["qp"]["a16"].with_points({}, version=6)  # int16 specs: not this runtime's model
    cases = {
        "unknown_profile": ("train", job_content(ins6, "a16")),
        "bad_instruction": ("train", job_content(ins6, "int8", tamper=_tamper_grid)),
        "bad_instruction/nan": ("train", job_content(ins6, "int8", tamper=_tamper_scale(np.nan))),
        "bad_instruction/negative": ("train", job_content(ins6, "int8", tamper=_tamper_scale(-1.0))),
        "stale_version": ("train", job_content(stats_ins(qp, version=4), "int8")),
        "unknown_job": ("train", job_content(Instruction(0, "eval", qp.with_points({}, version=6)), "int8")),
        "unknown_job/evaluate": ("evaluate", job_content(Instruction(0, "scout", qp.with_points({}, version=6),
                                                                     keys=tuple(act_keys(qp))), "int8")),
        "unknown_job/type": ("sample", job_content(ins6, "int8")),
        "unknown_job/query": ("query", RecordDict({"config": ConfigRecord({"fedquant": "bye"})})),
        "patch_refused": ("evaluate", job_content(Instruction(0, "eval", other), "int8")),
        "bad_instruction/header": ("train", RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord(
            {"header": "{not json", "profile": "int8", "batch-size": 4})})),
        "bad_instruction/batch": ("train", job_content(ins6, "int8", batch=0)),
    }
    held_qp, last = rt.qparams, dict(rt.last_patch)
    logits = rt.logits(ids(5, 2))
    reasons = {}
    for what, (mtype, content) in cases.items():
        r = send(dd, "0", mtype, content, state)
        assert "error" in r, what
        code, reason = r["error"]["code"], r["error"]["reason"]
        reasons[what] = reason
        assert code == what.split("/")[0], (what, code, reason)
        assert rt.qparams is held_qp and rt.last_patch == last and state["held"]["version"] == 5, what
    assert reasons["bad_instruction"].startswith("shape:")
    assert reasons["bad_instruction/nan"].startswith("scale_range:")
    assert reasons["bad_instruction/negative"].startswith("scale_range:")
    assert "older than the held version 5" in reasons["stale_version"]
    assert np.array_equal(rt.logits(ids(5, 2)), logits)
    # a node the device dir does not know, and data that is not there
    r = capp.handle("query", hello(), {"partition-id": 9}, run_cfg(dd), RecordDict())
    assert r["error"]["code"] == "no_data" and "no node '9'" in r["error"]["reason"]
    r = capp.handle("query", hello(), {"partition-id": 0}, {}, RecordDict())
    assert r["error"]["code"] == "no_data"
    # the memory budget is checked before the eval patch: nothing patched
    tiny = DeviceProfile(name="int8", memory_mb=0.01)
    capp._PROFILES[(str(dd["dir"].resolve()), "int8")] = tiny
    r = send(dd, "0", "evaluate", job_content(Instruction(0, "eval", qp.with_points({}, version=7)), "int8"), state)
    assert r["error"]["code"] == "memory_budget" and rt.qparams is held_qp and state["held"]["version"] == 5


def test_model_loaded_once(dd, monkeypatch):
    built = []

    class Counting(capp.DeviceRuntime):
        def __init__(self, *a, **kw):
            built.append(a[0])
            super().__init__(*a, **kw)

    monkeypatch.setattr(capp, "DeviceRuntime", Counting)
    states = {pid: RecordDict() for pid in NODES}
    for rnd in range(2):
        for pid, (p, _, _) in NODES.items():
            qp = dd["qp"][p]
            assert "info" in send(dd, pid, "query", hello(), states[pid])
            r = send(dd, pid, "train", job_content(stats_ins(qp, version=rnd), p), states[pid])
            assert "arrays" in r, dict(r.get("error", {}))
            r = send(dd, pid, "evaluate", job_content(Instruction(rnd, "eval", qp.with_points({}, version=rnd)), p),
                     states[pid])
            assert "error" not in r
    assert sorted(Path(b).parent.name for b in built) == ["a16", "int8"]  # one per profile
    assert len(capp._DATA) == 3 and not capp._TORCH  # no torch model without an lsq job


def test_a_process_holds_only_what_the_current_job_needs_and_the_replies_do_not_change(dd):
    """release_for (issue 19): an lsq job drops the float capture and the integer session, a
    statistics job the torch model and the integer session, an eval job the capture and the other
    profiles' sessions; each is built again when a job needs it, and the same instructions give
    the same bits."""
    qp = dd["qp"]["int8"]
    d = str(dd["dir"].resolve())
    stats = job_content(stats_ins(qp, version=1), "int8")
    ev = job_content(Instruction(2, "eval", qp.with_points({}, version=1)), "int8")
    lsq = job_content(Instruction(3, "lsq", qp.with_points({}, version=1), keys=tuple(act_keys(qp)[:4])),
                      "int8", batch=2, learn={"steps": 2})
    first_stats = payload(send(dd, "0", "train", stats, RecordDict()))
    rt = capp.get_runtime(d, "int8")
    assert rt._capture is not None and rt._session is None and capp._CAPTURES   # statistics: no integer session
    first_eval = send(dd, "0", "evaluate", ev, RecordDict())["metrics"]
    assert rt._capture is None and not capp._CAPTURES and rt._session is not None
    first_lsq = payload(send(dd, "1", "train", lsq, RecordDict()))
    assert capp._TORCH and rt._session is None and rt._capture is None
    again_stats = payload(send(dd, "0", "train", stats, RecordDict()))
    assert not capp._TORCH and rt._capture is not None and rt._session is None
    again_eval = send(dd, "0", "evaluate", ev, RecordDict())["metrics"]
    qa = dd["qp"]["a16"]                                   # an eval of another profile: one session at a time
    assert "error" not in send(dd, "2", "evaluate", job_content(Instruction(2, "eval", qa.with_points({}, version=1)),
                                                                "a16"), RecordDict())
    assert rt._session is None and capp.get_runtime(d, "a16")._session is not None
    again_lsq = payload(send(dd, "1", "train", lsq, RecordDict()))
    assert capp.get_runtime(d, "int8") is rt                                   # the runtime itself stays
    for a, b in ((first_stats, again_stats), (first_lsq, again_lsq)):
        assert a[1] == b[1] and a[0].keys() == b[0].keys() and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
    assert first_eval["nll_sum"] == again_eval["nll_sum"] and first_eval["tokens"] == again_eval["tokens"]


def delivered(content, message_type, mid):
    """A Message as a SuperNode hands it to the ClientApp (metadata set by the SuperLink)."""
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id=f"m{mid}", src_node_id=0, dst_node_id=11, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type))


def test_flower_calls_the_app(dd):
    ctx = Context(run_id=1, node_id=11, node_config=node_cfg("2"), state=RecordDict(), run_config=run_cfg(dd))
    msg = delivered(hello(), "query", 1)
    rep = capp.app(msg, ctx)
    assert isinstance(rep, Message) and rep.metadata.reply_to_message_id == msg.metadata.message_id
    assert rep.content["info"]["profile"] == "a16"
    qp = dd["qp"]["a16"]
    ins = stats_ins(qp, version=2)
    msg = delivered(job_content(ins, "a16"), "train", 2)
    rep = capp.app(msg, ctx)
    flat, header = payload(rep.content)
    assert not isinstance(validate_stats_reply(flat, header, ins, rep.content["metrics"]["num-examples"]), Rejection)
    assert ctx.state["held"]["version"] == 2  # kept in the node's Context.state
    ev = delivered(job_content(Instruction(1, "eval", qp.with_points({}, version=1)), "a16"), "evaluate", 3)
    assert capp.app(ev, ctx).content["error"]["code"] == "stale_version"


def test_app_imports_without_torch():
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def guarded(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ImportError('no torch on this device')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guarded\n"
            "import client.app, client.device\nassert 'torch' not in sys.modules\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_one_torch_model_per_process(dd):
    """A simulation actor serves nodes of several profiles; it keeps one torch model (the last
    profile's), so two LSQ profiles do not hold two copies of the weights."""
    a = capp.get_torch_model(str(dd["dir"]), "int8")
    assert capp.get_torch_model(str(dd["dir"]), "int8") is a and list(capp._TORCH) == [(str(dd["dir"]), "int8")]
    b = capp.get_torch_model(str(dd["dir"]), "a16")
    assert b is not a and list(capp._TORCH) == [(str(dd["dir"]), "a16")]


def test_torch_jobs_take_turns(dd, tmp_path):
    """With run_config ``torch-lock``, a torch job waits while another process (here: this test)
    holds the lock, then answers as without the lock, bit for bit. Jobs that are not torch ones
    never wait; turns never overlap."""
    import fcntl
    import threading

    lock = tmp_path / "torch-jobs.lock"
    qp = dd["qp"]["int8"].with_points({}, version=1)
    ins = Instruction(round=3, job="lsq", qparams=qp, keys=tuple(act_keys(qp)[:4]))
    content = job_content(ins, "int8", batch=2, learn={"steps": 2})
    expected = payload(send(dd, "1", "train", content, RecordDict()))[0]
    seen: dict = {}

    def job():
        cfg = {**run_cfg(dd), "torch-lock": str(lock)}
        seen["reply"] = capp.handle("train", content, node_cfg("1"), cfg, RecordDict())

    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        t = threading.Thread(target=job)
        t.start()
        t.join(timeout=3.0)
        assert t.is_alive() and "reply" not in seen        # waiting for its turn
        eval_ins = Instruction(round=4, job="eval", qparams=qp)
        ev = capp.handle("evaluate", job_content(eval_ins, "int8"), node_cfg("1"),
                         {**run_cfg(dd), "torch-lock": str(lock)}, RecordDict())
        assert "metrics" in ev, ev                         # not a torch job: no wait
        fcntl.flock(f, fcntl.LOCK_UN)
    t.join(timeout=120)
    assert not t.is_alive()
    got = payload(seen["reply"])[0]
    assert set(got) == set(expected) and all(np.array_equal(got[k], expected[k]) for k in expected)

    spans = []

    def turn():
        with capp.torch_turn(str(lock)):
            spans.append((time.monotonic(), "enter"))
            time.sleep(0.3)
            spans.append((time.monotonic(), None))

    ts = [threading.Thread(target=turn) for _ in range(3)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    # each enter is followed by its own exit: no two turns overlap
    assert [n is None for _, n in spans] == [False, True] * 3


def test_a_hessian_job_patches_nothing_and_refuses_a_wrong_width_or_model_before_any_work(dd):
    """A hessian instruction carries no points (docs/protocol.md): the node answers from the float
    graph and keeps its runtime and held version; a width other than the Linear's, or another
    model's fingerprint, is refused with nothing changed."""
    from quant.qparams import QParams
    from quant.wire import decode_hessian_reply
    from server.validate import validate_hessian_reply

    qp = dd["qp"]["int8"]
    rt = capp.get_runtime(str(dd["dir"].resolve()), "int8")
    state = RecordDict()
    r = send(dd, "0", "evaluate", job_content(Instruction(0, "eval", qp.with_points({}, version=5)), "int8"), state)
    assert r["metrics"]["version"] == 5
    widths = rt.activation_widths()
    keys = sorted(k for k in widths if k.endswith(("down_proj:input", "q_proj:input")))[:3]
    held_qp = rt.qparams

    def ins(model=qp.model, wide=0):
        return Instruction(1, "hessian", QParams({}, model, 9), keys=tuple(keys),
                           hessian={k: widths[k] + (wide if i == 0 else 0) for i, k in enumerate(keys)})

    good = ins()
    r = send(dd, "0", "train", job_content(good, "int8"), state)
    flat, header = payload(r)
    got = validate_hessian_reply(flat, header, good, r["metrics"]["num-examples"])
    assert not isinstance(got, Rejection), got
    assert decode_hessian_reply(flat, header, good).tokens == NODES["0"][1] * T
    assert rt.qparams is held_qp and state["held"]["version"] == 5 and "patch_s" not in r["metrics"]
    for bad, code, words in [(ins(wide=1), "bad_instruction", f"hessian: {keys[0]}: the server expects"),
                             (ins(model="another"), "patch_refused", "second moments asked of model 'another'")]:
        r = send(dd, "0", "train", job_content(bad, "int8"), state)
        assert r["error"]["code"] == code and r["error"]["reason"].startswith(words), dict(r["error"])
        assert rt.qparams is held_qp and state["held"]["version"] == 5

"""`fedquant simulate` end to end on the tiny model (configs/smoke.toml), on Flower's real
simulation engine (Ray), each run in its own process as a user starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quant.qparams import load_qparams

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"
FEDQUANT = [sys.executable, "-c", "from simulation.cli import main; main()"]


def _env():
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def simulate(out: Path, *args: str, timeout: float = 600, config: Path = SMOKE) -> subprocess.CompletedProcess:
    proc = subprocess.run([*FEDQUANT, "simulate", "--config", str(config), "--out", str(out), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"fedquant simulate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _same_qparams(a, b) -> None:
    assert set(a.points) == set(b.points)
    for k in a.points:
        pa, pb = a.points[k], b.points[k]
        assert pa.spec == pb.spec, k
        assert np.array_equal(pa.scale, pb.scale) and pa.scale.dtype == pb.scale.dtype, k
        assert np.array_equal(pa.zero_point, pb.zero_point), k
    assert set(a.smoothing) == set(b.smoothing)
    for k in a.smoothing:
        assert np.array_equal(a.smoothing[k], b.smoothing[k]) and a.smoothing[k].dtype == b.smoothing[k].dtype, k


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "smoke"
    t0 = time.perf_counter()
    proc = simulate(out)
    return out, proc, time.perf_counter() - t0


def test_smoke_run_writes_what_design_says(full_run):
    out, proc, wall = full_run
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert [m["job"] for m in metrics] == ["scout", "stats", "stats", "eval", "lsq", "eval"]
    assert set(summary["profiles"]) == {"int8", "int16"}
    for p, s in summary["profiles"].items():
        for key in ("float_ppl", "random_calib_ppl", "centralized_ppl"):
            assert isinstance(s[key], float) and np.isfinite(s[key]) and s[key] > 1, (p, key)
        assert len(s["federated_ppl"]) == 2 and all(np.isfinite(s["federated_ppl"]))
        # fidelity to float beside each perplexity, with bootstrap intervals over sequences
        for ev in (*s["federated_eval"], s["random_calib"], s["centralized"]):
            assert ev["float_perplexity"] == pytest.approx(s["float_ppl"])
            assert ev["kl"] > 0 and 0 < ev["top1"] <= 1 and ev["sequences"] == 8
            ood = ev["ood"]                 # the out-of-domain text, beside the held-out roles
            assert ood["sequences"] == 8 and ood["kl"] > 0 and ood["float_perplexity"] > 1
            for key in ("vs_float_pct", "kl", "top1"):
                assert ev[f"{key}_ci"][0] <= ev[f"{key}_ci"][1], key
        assert [e["perplexity"] for e in s["federated_eval"]] == s["federated_ppl"]
        assert s["bytes_up_per_client_round"] and s["bytes_down_per_client_round"]
        assert s["clients"] >= 1
        assert load_qparams(out / "qparams" / f"{p}.safetensors").version >= 1
        for f in ("model.onnx", "model.names.json", "encodings.json"):
            assert (out / "export" / p / f).is_file(), f
        enc = json.loads((out / "export" / p / "encodings.json").read_text())
        assert enc["activation_encodings"] and enc["param_encodings"]
    assert summary["clients"] == 6 and summary["rounds"] == 6
    # the evaluation set: 8 windows, each of another held-out role, named in summary.json
    ids = summary["data"]["eval_ids"]
    assert len(ids) == 8 and len({w["id"] for w in ids}) == 8 and all(w["window"] == 0 for w in ids)
    assert summary["data"]["ood_sequences"] == 8 and len({w["id"] for w in summary["data"]["ood_ids"]}) == 8
    for png in ("perplexity.png", "scale_drift.png"):
        assert (out / png).stat().st_size > 10_000
    # statistics rounds sample without replacement: every client contributed once
    stats = [m for m in metrics if m["job"] == "stats"]
    assert sum(m["replies"] for m in stats) == 6
    assert "round   5 lsq" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("ranked,rotated", [(False, False), (True, False), (True, True)],
                         ids=["minmax", "importance", "rotated"])
def test_federated_statistics_equal_centralized_bit_for_bit(tmp_path, ranked, rotated):
    """Scouting with SmoothQuant (configs/smoke.toml) + two statistics rounds (every client once,
    over two sampled rounds) under the exact rules (sums and maxima; the bounded-influence defaults
    trade exactness for robustness): the global QParams -- smoothing factors, smoothed weight
    points, activation ranges -- equal the same recipe on the pooled training data, bit for bit.
    The int8 profile quantizes its down_proj and lm_head inputs per token, as the default run does:
    those Linears are scouted and smoothed too, though they have no input point, and rotated (the
    default ``per_token_rotation``: their weight points are of ``(W * m) R`` on both sides; the tied
    embedding rotates lm_head's rows back). ``importance``: the int16 profile ranges its weights by the
    fleet's per-channel mean squares (``weight_ranges``): summed in the scouting round, the same
    weight points on both sides and on the devices. ``rotated``: the int16 profile also rotates
    every ``*_proj`` input (``rotate``): its points' statistics are of ``(x / m) R`` on both sides
    (grids under their own ``@r`` keys), its rotated weights ranged by plain MSE (importance ones)."""
    from quant.qparams import per_token_linears, rotated_linears
    from quant.rotation import rotation_of

    exact = tmp_path / "exact.toml"
    rule = 'weight_ranges = { int16 = "importance" }\n' if ranked else ""
    text = SMOKE.read_text().replace("[server]\n", f'[server]\nstats_rule = "sum"\nabsmax_rule = "max"\n{rule}', 1)
    text = text.replace('profile = "int16"\nshare = 1\n', 'profile = "int16"\nshare = 1\nrotate = ["*_proj"]\n') \
        if rotated else text
    exact.write_text(text.replace('profile = "int8"\nshare = 2\n', 'profile = "int8"\nshare = 2\nper_token = ["*.down_proj", "lm_head"]\n'))
    out = tmp_path / "stats-only"
    simulate(out, "--rounds", "3", config=exact)
    for p in ("int8", "int16"):
        fed = load_qparams(out / "qparams" / f"{p}.safetensors")
        central = load_qparams(out / "qparams" / f"{p}.centralized.safetensors")
        _same_qparams(fed, central)
        start = load_qparams(out / "initial" / f"{p}.safetensors")
        assert set(fed.smoothing) == set(start.smoothing) and len(fed.smoothing) >= 7   # every Linear
        assert all(np.all(start.smoothing[k] == 1) for k in start.smoothing)
        assert all(not np.all(fed.smoothing[k] == 1) for k in fed.smoothing)
        assert set(per_token_linears(fed)) <= set(fed.smoothing) and bool(per_token_linears(fed)) == (p == "int8")
        assert ("lm_head" in per_token_linears(fed)) == (p == "int8") == ("lm_head:input" not in fed.points)
        assert rotation_of(fed.meta) == rotation_of(central.meta) == (128 if p == "int8" or rotated else 0)
        changed = [k for k in fed.points if not np.array_equal(fed.points[k].scale, start.points[k].scale)]
        assert len(changed) >= len([k for k in fed.points if k.endswith(":input")]) // 2
        weights = sorted(k.rsplit(":", 1)[0] for k in fed.points if k.endswith(":weight"))
        assert sorted(fed.importance) == (weights if ranked and p == "int16" else [])
        assert all(np.all(h > 0) for h in fed.importance.values())
        turned = rotated_linears(fed)
        assert turned == rotated_linears(central) == (sorted(w for w in weights if w.endswith("_proj"))
                                                      if rotated and p == "int16" else [])
        assert all(np.all(fed.importance[w] == 1) != (w not in turned) for w in fed.importance)


def test_a_profile_with_every_input_per_token_scouts_evaluates_and_sits_out_the_rest(tmp_path):
    """The default int8 profile quantizes every Linear input per token: it keeps no activation point,
    so its clients sit the statistics and learned-range rounds out (no failed job, nothing uploaded),
    take the scouting round's smoothing factors (a version with no points: the eval instruction
    still patches the device) and are evaluated at that version."""
    from quant.qparams import per_token_linears

    cfg = tmp_path / "all-per-token.toml"
    every = '["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj", "lm_head"]'
    cfg.write_text(SMOKE.read_text().replace('profile = "int8"\nshare = 2\n',
                                             f'profile = "int8"\nshare = 2\nper_token = {every}\n'))
    out = tmp_path / "run"
    simulate(out, config=cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["job"] for m in metrics] == ["scout", "stats", "stats", "eval", "lsq", "eval"]
    assert all(not m["rejections"] for m in metrics), [m["rejections"] for m in metrics]
    for m in metrics:
        assert ("int8" in m["bytes"]) == (m["job"] in ("scout", "eval")), m
        assert m["versions"]["int8"] == 1, m       # the scouting round's factors, nothing after
    evals = [m for m in metrics if m["job"] == "eval"]
    assert all(m["replies"] == m["sampled"] and "int8" in m["eval"] for m in evals), evals
    fed = load_qparams(out / "qparams" / "int8.safetensors")
    assert not [k for k in fed.points if not k.endswith(":weight")]
    assert set(per_token_linears(fed)) == {k.rsplit(":", 1)[0] for k in fed.points}    # every Linear
    assert all(not np.all(f == 1) for f in fed.smoothing.values())
    # a fleet of that profile alone: the centralized reference has no statistics to take either
    alone = tmp_path / "alone.toml"
    alone.write_text(cfg.read_text().replace('[[fleet]]\nprofile = "int16"\nshare = 1\n', ""))
    assert "int16" not in alone.read_text()
    simulate(tmp_path / "alone", "--rounds", "1", config=alone)
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert list(summary["profiles"]) == ["int8"] and summary["profiles"]["int8"]["centralized_ppl"] > 0


def test_sigkill_then_resume_gives_the_same_result(full_run, tmp_path):
    """The whole process group killed with SIGKILL after round 3's checkpoint; started again with
    the same out directory, the run resumes and ends with the uninterrupted run's QParams."""
    ref_out = full_run[0]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*FEDQUANT, "simulate", "--config", str(SMOKE), "--out", str(out)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "summary.json").exists()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 3 <= done < 6
    again = simulate(out)
    assert "resum" in again.stderr.lower(), again.stderr[-2000:]
    for p in ("int8", "int16"):
        _same_qparams(load_qparams(out / "qparams" / f"{p}.safetensors"),
                      load_qparams(ref_out / "qparams" / f"{p}.safetensors"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(1, 7))


def test_bad_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE.read_text().replace('profile = "int16"', 'profile = "no-such-profile"'))
    proc = subprocess.run([*FEDQUANT, "simulate", "--config", str(bad), "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no-such-profile" in proc.stderr and "fleet[1]" in proc.stderr
    assert not (tmp_path / "o").exists()
    bad.write_text(SMOKE.read_text().replace("[data]\n", "[data]\nclinets = 3\n"))
    proc = subprocess.run([*FEDQUANT, "simulate", "--config", str(bad), "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.clinets" in proc.stderr and str(bad) in proc.stderr
    bad.write_text(SMOKE.read_text().replace("smoothing = { alpha = 0.8 }",
                                             'smoothing = { alpha = 0.8, profiles = { int4 = 0.5 } }'))
    proc = subprocess.run([*FEDQUANT, "simulate", "--config", str(bad), "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "server.smoothing.profiles" in proc.stderr and "int4" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unreliable_devices_drop_at_their_rates_deterministically():
    """Simulated availability and dropout: error records with their own codes, at the configured
    rates (within 3 points on 4000 draws), the same draws on every call, queries untouched."""
    import json as _json

    from flwr.app import ConfigRecord, RecordDict

    from simulation.faults import Unreliable

    u = Unreliable({"0": (0.7, 0.2), "1": (1.0, 0.0)}, seed=3)

    def msg(rnd):
        return RecordDict({"config": ConfigRecord({"header": _json.dumps({"round": rnd})})})

    codes = [u.lost("train", msg(r), {"partition-id": 0}) for r in range(4000)]
    got = [None if c is None else c["error"]["code"] for c in codes]
    assert abs(got.count("unavailable") / 4000 - 0.3) < 0.03
    assert abs(got.count("dropout") / 4000 - 0.7 * 0.2) < 0.03
    assert got == [None if c is None else c["error"]["code"]
                   for c in (u.lost("evaluate", msg(r), {"partition-id": 0}) for r in range(4000))]
    assert all(u.lost("train", msg(r), {"partition-id": 1}) is None for r in range(200))
    assert u.lost("query", msg(1), {"partition-id": 0}) is None


def test_unreliable_devices_are_a_client_app_mod_around_the_real_client():
    """As a Flower mod: a lost device's message never reaches the ClientApp, and its reply is the
    error record; any other message goes through to the app unchanged."""
    import json as _json

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from simulation.faults import Unreliable

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    offline = Unreliable({"0": (0.0, 0.0)}, seed=3)          # never available
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reached = []

    def app(msg, context):
        reached.append(msg.metadata.message_type)
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    def sent(message_type):
        m = Message(RecordDict({"config": ConfigRecord({"header": _json.dumps({"round": 4})})}), dst_node_id=7,
                    message_type=message_type)
        m.metadata.__dict__["_message_id"] = m.object_id
        return m

    reply = offline(sent("train"), ctx, app)
    assert reply.content["error"]["code"] == "unavailable" and reached == []
    assert offline(sent("query"), ctx, app).content["config"]["ok"] == 1 and reached == ["query"]


def test_every_shipped_simulation_config_loads_and_prepared_from_pairs_match():
    """The Makefile's ``--prepared-from runs/default`` works only for a config with the default's
    recipe (``config_digest``: everything but the schedule and the name)."""
    import re

    from simulation.prepare import config_digest, load_simulation_config

    shipped = [ROOT / "configs" / n for n in ("default.toml", "smoke.toml", "fleet-smoke.toml")]
    shipped += sorted((ROOT / "configs" / "quality").glob("*.toml"))
    cfgs = {p.name: load_simulation_config(p) for p in shipped}
    make = (ROOT / "Makefile").read_text()
    reused = re.findall(r"--config configs/quality/(\S+) --out \S+ --prepared-from runs/default", make)
    assert {"sample10.toml", "lsq4.toml"} <= set(reused)
    for name in reused:
        assert config_digest(cfgs[name]) == config_digest(cfgs["default.toml"]), name
    for name in set(cfgs) - set(reused) - {"default.toml", "smoke.toml", "fleet-smoke.toml"}:
        assert f"configs/quality/{name}" in make, f"{name} is not run by make bench-quality"
    lsq = [s for s in cfgs["lsq4.toml"].server.schedule if s.job == "lsq"]
    assert len(lsq) == 2 and all(s.by_profile and s.repeat == 2 for s in lsq)
    assert cfgs["distill.toml"].server.learn.loss == "distill"

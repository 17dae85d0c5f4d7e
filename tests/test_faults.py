"""Faults on Flower's deployment engine (issue 14, goal 5): a ClientApp that exits, raises or hangs
in the middle of its job or poisons its statistics, a SuperNode killed with SIGKILL in the middle of
the run, and the ServerApp killed with SIGKILL in the middle of a round of a poisoned run: the run
completes or resumes, and nothing committed is lost.

The fleets are real (``server.fleet.deployment``: a SuperLink with TLS and node authentication,
one SuperNode process per device, the tiny model of ``configs/fleet-faults.toml``); the faults
come from the ``simulation.faults.Hostile`` ClientApp mod, selected per node by its node config, in
the staged app ``simulation.faults:hostile_app`` (the real ClientApp knows nothing of faults).
Every process a test starts is stopped by PID, and checked gone, at its end. The fast tests pin
the pieces: the mod, the poisoned replies passing validation, the run-directory lock, and the
metrics line written before the checkpoint commits it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from quant.qparams import load_qparams, qparams_problems
from quant.wire import encode_instruction
from server.fleet import deployment
from server.fleet.processes import alive, descendants
from server.state import load_checkpoint
from server.strategy import CHECKPOINT, METRICS
from simulation import faults

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ROOT / "configs" / "fleet-faults.toml"
HOSTILE = "simulation.faults:hostile_app"
ENV = dict(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

# flwr's FAB builder uses a pathspec pattern class that pathspec deprecates
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


@pytest.fixture
def task_identity():
    """Flower 1.42 builds message metadata from TaskIdentity, which a ServerApp run sets."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# ------------------------------------------------------------------------------ fast: the pieces

def _job(ins, config, node_id=7):
    from server.messages import instruction_message

    msg = instruction_message(node_id, "u8", ins, *encode_instruction(ins), config)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _context(**node_config):
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                   run_config={})


def _scout_and_stats(config):
    """A scout instruction, and the stats instruction of the state after an honest scout round."""
    from server.rounds import apply_round, instructions_for
    from server.state import initial_state
    from tests.test_rounds import client_data, make_initial, scout_replies

    state = initial_state(make_initial(), "test")
    rounds = dict(config.rounds())
    scout = instructions_for(state, 1, rounds[1], config, None)["u8"]
    data = client_data(3)
    state, _ = apply_round(state, 1, rounds[1], scout_replies(data, sorted(data)), [], config)
    assert state.grids
    stats = instructions_for(state, 2, rounds[2], config, None)["u8"]
    return scout, stats, data


def test_hostile_mod_touches_only_the_jobs_of_its_rounds(task_identity, monkeypatch):
    """``fault`` acts on job messages of the ``fault-rounds`` only; the hello always gets through
    (the node joins the roster); ``exit`` ends the process, ``raise`` raises, ``hang`` sleeps
    ``hang-s`` then answers."""
    from server.config import ServerConfig
    from tests.test_server_app import FakeNode

    config = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}], bins=64, grid_quantile=1.0, batch_size=4)
    scout, _, data = _scout_and_stats(config)
    node = FakeNode("c00", "u8", data["c00"])
    mod = faults.Hostile()
    reached = []

    def app(msg, context):
        reached.append(msg.metadata.message_type)
        return node.handle(msg)

    hello = Message(RecordDict({"config": ConfigRecord({"fedquant": "hello"})}), dst_node_id=7, message_type="query")
    hello.metadata.__dict__["_message_id"] = hello.object_id
    for fault in faults.FAULTS:
        assert "info" in mod(hello, _context(fault=fault), app).content
    assert reached == ["query"] * len(faults.FAULTS)

    msg = _job(scout, config)
    exits, sleeps = [], []

    def exit_(code):                    # os._exit would end pytest
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(faults.os, "_exit", exit_)
    monkeypatch.setattr(faults.time, "sleep", sleeps.append)
    with pytest.raises(SystemExit):
        mod(msg, _context(fault="exit"), app)
    assert exits == [faults.EXIT_CODE] and reached.count("train") == 0
    with pytest.raises(RuntimeError, match="injected fault: node 0 in round 1 raised"):
        mod(msg, _context(fault="raise"), app)
    assert "arrays" in mod(msg, _context(fault="hang", **{"hang-s": 25.5}), app).content and sleeps == [25.5]
    # another round: untouched
    assert "arrays" in mod(msg, _context(fault="raise", **{"fault-rounds": "2,3"}), app).content
    assert faults.fault_rounds({"fault-rounds": 4}) == {4} and faults.fault_rounds({}) is None
    with pytest.raises(ValueError, match="fault=.*one of exit, raise, hang, poison"):
        mod(msg, _context(fault="explode"), app)
    with pytest.raises(ValueError, match="fault-rounds"):
        faults.fault_rounds({"fault-rounds": "1 2"})


def test_poisoned_replies_are_well_formed_so_validation_accepts_them(task_identity):
    """The poison is what validation cannot catch: the server's own checks accept both poisoned
    replies, with the extremes the mod promises (min/max at +-1e4, every stats value outside the
    grid, the counts still adding up to n)."""
    from server.config import ServerConfig
    from server.validate import Rejection, validate_scout_reply, validate_stats_reply
    from tests.test_server_app import FakeNode

    config = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}], bins=64, grid_quantile=1.0, batch_size=4)
    scout, stats, data = _scout_and_stats(config)
    node = FakeNode("c00", "u8", data["c00"])
    for ins, validate in ((scout, validate_scout_reply), (stats, validate_stats_reply)):
        honest = node.handle(_job(ins, config))
        bad = faults.Hostile()(_job(ins, config), _context(fault="poison"), lambda m, c: node.handle(m))
        flat = {k: v.numpy() for k, v in bad.content["arrays"].items()}
        r = validate(flat, bad.content["config"]["header"], ins, int(bad.content["metrics"]["num-examples"]))
        assert not isinstance(r, Rejection), r
        assert dict(bad.content["metrics"]) == dict(honest.content["metrics"])
        if ins.job == "scout":
            assert all(r.ranges[k] == (-faults.POISON_RANGE, faults.POISON_RANGE) for k in ins.keys)
        else:
            for k, s in r.stats.items():
                assert s.n > 1 and s.counts.sum() == 0 and s.below + s.above == s.n, k
                assert (s.min, s.max) == (-faults.POISON_RANGE, faults.POISON_RANGE)
                assert s.min < s.grid.lo and s.max > s.grid.hi


def test_a_run_directory_takes_one_server_at_a_time(tmp_path):
    """A second ServerApp on a run directory in use fails at once, naming the holder; the lock
    goes with its holder (a killed process's lock is dropped by the kernel)."""
    import subprocess
    import sys

    from server.strategy import run_lock

    with run_lock(tmp_path):
        with pytest.raises(RuntimeError, match=rf"in use by another run of the ServerApp \(pid {os.getpid()} "):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):          # released
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pathlib import Path; from server.strategy import run_lock\n"
                               "with run_lock(Path(sys.argv[2])):\n print('locked', flush=True); time.sleep(600)",
                               str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid} "):
            with run_lock(tmp_path):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        with run_lock(tmp_path):
            pass
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(30)


class Killed(BaseException):
    """SIGKILL, as far as the strategy can tell: nothing after it runs."""


@pytest.mark.parametrize("at", ["append_metrics", "save_checkpoint"])
def test_a_kill_around_the_commit_loses_no_round(tmp_path, monkeypatch, task_identity, at):
    """Killed just before the metrics line of round 3 or just before its checkpoint: the resumed
    run has one line per round, 1 to 7, and the uninterrupted run's QParams (the line is written
    first, so a line is never lost behind a checkpoint that already holds its round)."""
    import server.strategy
    from server.app import run_server
    from tests.test_server_app import FakeGrid, config, fleet, lines, make_initial, same_qparams

    full = run_server(FakeGrid(fleet()), config(), make_initial(), tmp_path / "full")
    real = getattr(server.strategy, at)
    calls = []

    def dies_at_round_3(*args):         # append_metrics(path, row), save_checkpoint(state, path)
        rnd = next(a["round"] if isinstance(a, dict) else a.round for a in args if not isinstance(a, Path))
        calls.append(rnd)
        if rnd == 3:
            raise Killed
        return real(*args)

    out = tmp_path / "cut"
    monkeypatch.setattr(server.strategy, at, dies_at_round_3)
    with pytest.raises(Killed):
        run_server(FakeGrid(fleet()), config(), make_initial(), out)
    monkeypatch.setattr(server.strategy, at, real)
    assert calls == [1, 2, 3]
    assert load_checkpoint(out / CHECKPOINT).round == 2
    assert [r["round"] for r in lines(out)] == ([1, 2, 3] if at == "save_checkpoint" else [1, 2])
    same_qparams(run_server(FakeGrid(fleet(), base=500), config(), make_initial(), out), full)
    assert [r["round"] for r in lines(out)] == list(range(1, 8))


def test_a_run_directory_resumes_with_other_waiting_knobs(tmp_path):
    """After a fleet lost devices, the run is resumed with a lower ``min_available`` (or another
    ``reply_timeout_s``): the server's checkpoint takes it (server.config.OPERATIONAL), so the run
    directory's check must too."""
    from server.config import OPERATIONAL
    from simulation.prepare import config_digest, load_simulation_config

    assert {"reply_timeout_s", "min_available", "wait_s"} <= set(OPERATIONAL)
    fewer = tmp_path / "fewer.toml"
    fewer.write_text(FAULTS.read_text().replace("min_available = 3", "min_available = 2")
                     .replace("reply_timeout_s = 20", "reply_timeout_s = 30").replace("wait_s = 120", "wait_s = 600"))
    assert config_digest(load_simulation_config(fewer)) == config_digest(load_simulation_config(FAULTS))


def test_staged_app_can_name_the_hostile_client_app(tmp_path):
    """The fault runs stage the same packages with another ClientApp; the project's pyproject.toml
    and the default staging are untouched."""
    import tomllib

    from flwr.clientapp import ClientApp

    app = deployment.stage_app(tmp_path / "a", clientapp=HOSTILE)
    components = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:server_app", "clientapp": HOSTILE}
    assert isinstance(faults.hostile_app, ClientApp) and (app / "simulation" / "faults.py").is_file()
    plain = deployment.stage_app(tmp_path / "b")
    assert tomllib.loads((plain / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"][
        "clientapp"] == "client.app:app"
    with pytest.raises(ValueError, match="module:attribute"):
        deployment.stage_app(tmp_path / "c", clientapp="not an app")


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """configs/fleet-faults.toml prepared once (starting QParams, the device directory with the
    float graph): each fleet below starts its run directory from a copy (``_run_dir``); a schedule
    may differ."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        base = tmp_path_factory.mktemp("faults") / "prepared"
        deployment.prepare_run(FAULTS, base)
    return base


def _run_dir(prepared: Path, out: Path) -> Path:
    for name in ("initial", "device"):        # the float graph is device/float.onnx
        shutil.copytree(prepared / name, out / name)
    shutil.copy2(prepared / "run.json", out / "run.json")
    return out


def _all_pids(d: Path) -> set[int]:
    """The fleet's recorded processes and everything they started (SuperExec, ServerApp and
    ClientApp processes), now."""
    state = deployment.load_state(d)
    pids = [r["pid"] for r in state["supernodes"].values()]
    if state.get("superlink"):
        pids.append(state["superlink"]["pid"])
    return set(pids) | {k for p in pids for k in descendants(p)}


def _stop(d: Path, seen: set[int]) -> list[int]:
    """Stop the fleet by its recorded PIDs; the PIDs of ``seen`` still alive after 10 s."""
    seen |= _all_pids(d)
    deployment.stop_fleet(d)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(p for p in seen if alive(p))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def _wait_for(what: str, ok, timeout: float, d: Path, run_id: int, poll: float = 0.2):
    """Poll ``ok()`` until it returns something true; fail early, with the ServerApp's log, if the
    run ends first."""
    deadline, last_status = time.monotonic() + timeout, time.monotonic()
    while True:
        got = ok()
        if got:
            return got
        if time.monotonic() - last_status > 5:
            last_status = time.monotonic()
            status = deployment.run_status(d, run_id)
            assert not status.startswith("finished"), \
                f"run {run_id} ended ({status}) before {what}:\n{deployment.run_log(d, run_id)[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s"
        time.sleep(poll)


def _receiving(nodes: dict, run_id: int, rnd: int):
    """The first SuperNode (name) whose log shows it took a job of round ``rnd`` of run ``run_id``."""
    marker = f"[RUN {run_id}, ROUND {rnd}]"
    for name, rec in nodes.items():
        text = Path(rec["log"]).read_text(errors="replace")
        i = text.find(marker)
        if i >= 0 and "Receiving: train" in text[i:]:
            return name
    return None


def _check_final(out: Path) -> dict:
    """The committed QParams of every profile: the exported files equal the checkpoint's, they
    pass the device's own check over the starting QParams, and their versions went up."""
    ckpt = load_checkpoint(out / CHECKPOINT)
    for p, qp in ckpt.qparams.items():
        start = load_qparams(out / "initial" / f"{p}.safetensors")
        final = load_qparams(out / "qparams" / f"{p}.safetensors")
        assert final.version == qp.version > start.version, p
        assert qparams_problems(final, held=start) == [], p
        for k, pt in final.points.items():
            assert np.array_equal(pt.scale, qp.points[k].scale), (p, k)
    return {p: qp.version for p, qp in ckpt.qparams.items()}


def _versions_never_go_back(rows: list[dict]) -> None:
    for a, b in zip(rows, rows[1:]):
        assert all(b["versions"][p] >= v for p, v in a["versions"].items()), (a["versions"], b["versions"])


@pytest.mark.slow
def test_hostile_clients_on_a_real_fleet(tmp_path, monkeypatch):
    """Five SuperNodes: 0 honest; 1's ClientApp process exits in the middle of every job; 2's
    raises; 3's hangs 30 s, past reply_timeout_s (20 s); 4 poisons its statistics. Scouting, then
    statistics from everyone. The run completes; each failed reply is in metrics.jsonl under its
    client with its code: the raise is Flower's own error reply (``flower_error``), the exit and
    the hang are ``timeout`` (Flower's SuperNode answers for a dead ClientApp only once its
    heartbeat is 60 s late, and takes no other message until then); the poisoned replies are
    well-formed, so they are accepted; the committed QParams pass the device's check."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    d, out = tmp_path / "fleet", tmp_path / "run"
    text = FAULTS.read_text()
    assert "clients = 3" in text and "min_available = 3" in text
    config = tmp_path / "fleet-faults-5.toml"          # five devices, scouting then statistics from all
    config.write_text(text[:text.index("[[server.schedule]]")].replace("clients = 3", "clients = 5")
                      .replace("min_available = 3", "min_available = 5")
                      + "[[server.schedule]]\njob = \"scout\"\nmin_replies = 2\n\n"
                      "[[server.schedule]]\njob = \"stats\"\nfraction = 1.0\nmin_replies = 2\n")
    extra = {"1": {"fault": "exit"}, "2": {"fault": "raise"}, "3": {"fault": "hang", "hang-s": 30},
             "4": {"fault": "poison"}}
    failed = {"1": "timeout", "2": "flower_error", "3": "timeout"}
    t0, seen = time.perf_counter(), set()
    try:
        state = deployment.up(d, config, out, node_extra=extra)
        seen |= _all_pids(d)
        assert {n: r["node-config"].get("fault") for n, r in state["supernodes"].items()} == \
            {"node-0": None, "node-1": "exit", "node-2": "raise", "node-3": "hang", "node-4": "poison"}
        run_id = deployment.submit_run(d, config, out, out / "device", clientapp=HOSTILE)
        status = deployment.wait_run(d, run_id, timeout=600)
        seen |= _all_pids(d)
        assert status == "finished:completed", deployment.run_log(d, run_id)[-4000:]
        rows = _metrics(out)
        assert [(m["round"], m["job"]) for m in rows] == [(1, "scout"), (2, "stats")]
        for m in rows:
            assert m["sampled"] == 5 and m["roster"] == 5 and m["applied"], m
            assert m.get("rejected_clients") == failed and m["replies"] == 2, m
            assert m["rejections"] == {"timeout": 2, "flower_error": 1}
            assert "3 of 5 replies failed" in m["alert"]
        ckpt = load_checkpoint(out / CHECKPOINT)
        assert set(ckpt.used) == {"0", "4"}                  # the poisoner's statistics are in ...
        _versions_never_go_back(rows)
        _check_final(out)
        # ... but with one honest reply beside it, nothing can be trimmed: the robust rules' bounds
        # (the lower median for scouting, round_factor per statistics round) keep its +-1e4 from
        # widening a grid to it or setting a range (before them every int8 scale went to 78.4)
        assert ckpt.grids and all(g.hi - g.lo < faults.POISON_RANGE / 10 for g in ckpt.grids.values())
        for k, pt in ckpt.qparams["int8"].points.items():
            if k.endswith(":input"):
                assert float(pt.scale) * 255 < faults.POISON_RANGE / 10, (k, float(pt.scale))
        logs = {n: Path(r["log"]).read_text() for n, r in deployment.load_state(d)["supernodes"].items()}
        assert f"node 1 in round 1: the ClientApp exits with {faults.EXIT_CODE}" in logs["node-1"]
        assert "injected fault: node 2 in round 2 raised" in logs["node-2"]
        server_log = deployment.run_log(d, run_id)
        assert "reply of 2 rejected: flower_error" in server_log and "injected fault" in server_log
        assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    finally:
        left = _stop(d, seen)
        print(f"hostile clients on a fleet: {time.perf_counter() - t0:.0f}s")
    assert left == [] and deployment.running(d) == {}


@pytest.mark.slow
def test_a_supernode_killed_mid_job_leaves_the_run_to_the_others(prepared, tmp_path, monkeypatch):
    """Three honest SuperNodes; the first one to take a round-2 job is killed with SIGKILL (by the
    PID the fleet's state records) while the job runs. The run completes on the other two: the
    lost reply is recorded under the dead node's client (``timeout``; ``flower_error`` once the
    SuperLink declares the node unavailable), later rounds still sample it while the SuperLink
    lists it, its statistics are never counted, and the committed QParams pass the device's check."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    d, out = tmp_path / "fleet", _run_dir(prepared, tmp_path / "run")
    t0, seen = time.perf_counter(), set()
    try:
        deployment.up(d, FAULTS, out)
        seen |= _all_pids(d)
        run_id = deployment.submit_run(d, FAULTS, out, out / "device")          # the real ClientApp
        nodes = deployment.load_state(d)["supernodes"]
        victim = _wait_for("a round-2 job", lambda: _receiving(nodes, run_id, 2), 300, d, run_id)
        seen |= _all_pids(d)
        pid = nodes[victim]["pid"]
        kids = descendants(pid)
        os.kill(pid, signal.SIGKILL)          # the SuperNode only: its SuperExec and ClientApp follow it
        deadline = time.monotonic() + 30
        while any(alive(p) for p in [pid, *kids]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in [pid, *kids] if alive(p)] == []
        client = str(nodes[victim]["node-config"]["partition-id"])

        status = deployment.wait_run(d, run_id, timeout=600)
        seen |= _all_pids(d)
        assert status == "finished:completed", deployment.run_log(d, run_id)[-4000:]
        rows = _metrics(out)
        assert [(m["round"], m["job"]) for m in rows] == [(1, "scout"), (2, "stats"), (3, "stats")]
        assert rows[0]["replies"] == 3 and "rejected_clients" not in rows[0]
        assert list(rows[1]["rejected_clients"]) == [client]
        assert rows[1]["rejected_clients"][client] in ("timeout", "flower_error")
        assert set(rows[2].get("rejected_clients", {})) <= {client}
        assert all(m["applied"] and m["replies"] >= 1 for m in rows), rows
        assert sum(m["replies"] for m in rows[1:]) == 2               # every other client's statistics, once
        assert set(load_checkpoint(out / CHECKPOINT).used) == {"0", "1", "2"} - {client}
        assert set(deployment.running(d)) == {f"supernode {n}" for n in nodes if n != victim} | {"superlink"}
        _versions_never_go_back(rows)
        _check_final(out)
    finally:
        left = _stop(d, seen)
        print(f"supernode killed: {time.perf_counter() - t0:.0f}s")
    assert left == [] and deployment.running(d) == {}


@pytest.mark.slow
def test_serverapp_sigkilled_mid_round_of_a_poisoned_run_resumes(prepared, tmp_path, monkeypatch):
    """Three SuperNodes, node 2 poisoning its statistics, the other two slow in round 2 (4 s:
    the round stays open long enough to be interrupted). The ServerApp process (``flwr-serverapp``, a
    descendant of the SuperLink) is killed with SIGKILL while round 2 waits for its replies; the
    operator stops the dead run and submits it again on the same run directory: it resumes after
    round 1 and finishes. Round 1's metrics line is byte for byte what it was, round 2 is committed
    once, versions never go back, and the final QParams pass the device's check."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    d, out = tmp_path / "fleet", _run_dir(prepared, tmp_path / "run")
    slow = {"fault": "hang", "hang-s": 4, "fault-rounds": "2"}
    extra = {"0": slow, "1": slow, "2": {"fault": "poison"}}
    t0, seen = time.perf_counter(), set()
    try:
        deployment.up(d, FAULTS, out, node_extra=extra)
        seen |= _all_pids(d)
        run_id = deployment.submit_run(d, FAULTS, out, out / "device", clientapp=HOSTILE)
        nodes = deployment.load_state(d)["supernodes"]
        _wait_for("round 2 sent", lambda: _receiving(nodes, run_id, 2), 300, d, run_id)
        servers = deployment.serverapp_pids(d)
        seen |= _all_pids(d)
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(servers[0])
        # what was committed when the ServerApp died: round 1; round 2 was in flight
        committed = (out / METRICS).read_text()
        at_kill = load_checkpoint(out / CHECKPOINT)
        assert at_kill.round == 1 and [json.loads(x)["round"] for x in committed.splitlines()] == [1]
        assert not (out / "summary.json").exists()
        assert deployment.run_status(d, run_id) == "running"      # the SuperLink notices only ~60 s later
        deployment.stop_run(d, run_id)                              # so the operator stops it first

        again = deployment.submit_run(d, FAULTS, out, out / "device", clientapp=HOSTILE)
        status = deployment.wait_run(d, again, timeout=600)
        seen |= _all_pids(d)
        log = deployment.run_log(d, again)
        assert status == "finished:completed", log[-4000:]
        assert deployment.run_status(d, run_id) == "finished:stopped"
        assert "resuming after round 1" in log
        assert (out / METRICS).read_text().startswith(committed)
        rows = _metrics(out)
        assert [(m["round"], m["job"]) for m in rows] == [(1, "scout"), (2, "stats"), (3, "stats")]
        assert rows[0]["versions"] == {p: qp.version for p, qp in at_kill.qparams.items()}
        _versions_never_go_back(rows)
        assert all(m["applied"] and m["rejections"] == {} and "rejected_clients" not in m for m in rows), rows
        assert set(load_checkpoint(out / CHECKPOINT).used) == {"0", "1", "2"}     # the poisoner's too
        final = _check_final(out)
        assert all(final[p] > qp.version for p, qp in at_kill.qparams.items())
        assert json.loads((out / "summary.json").read_text())["rounds"] == 3
        assert deployment.serverapp_pids(d) == []
    finally:
        left = _stop(d, seen)
        print(f"serverapp killed and resumed: {time.perf_counter() - t0:.0f}s")
    assert left == [] and deployment.running(d) == {}

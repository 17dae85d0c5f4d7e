"""The FedQuant strategy on a fake in-process Grid: metrics lines, rejection codes, resume after an
interruption gives the same QParams bit for bit, clear errors for bad checkpoints, Flower's hooks
and Result, the ServerApp's setup."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from quant.stats import observe
from quant.wire import (LsqReply, ScoutReply, StatsReply, decode_instruction, encode_lsq_reply,
                        encode_scout_reply, encode_stats_reply)
from server.app import run_server
from server.config import ServerConfig
from server.roster import wait_for_nodes
from server.state import CheckpointError, initial_state, load_checkpoint, save_checkpoint, states_equal
from server.strategy import CHECKPOINT, METRICS
from tests.test_rounds import KEYS, PROFILES, client_data, make_initial


@pytest.fixture(autouse=True)
def task_identity():
    """Flower 1.42 builds message metadata from TaskIdentity, which a ServerApp run sets."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class FakeNode:
    """A client answering docs/protocol.md messages from its own activations, or misbehaving:
    ``garbage`` (unparseable payloads), ``crash`` (client error record), ``flower_error``,
    ``timeout`` (no reply to jobs; it does answer hello)."""

    def __init__(self, cid, profile, acts, behaviour="ok"):
        self.cid, self.profile, self.acts, self.behaviour = cid, profile, acts, behaviour
        self.jobs = 0

    def handle(self, msg: Message) -> Message | None:
        mtype = msg.metadata.message_type
        if mtype == "query":
            assert msg.content["config"]["fedquant"] == "hello"
            return Message(RecordDict({"info": ConfigRecord({"client-id": self.cid, "profile": self.profile,
                                                             "train-examples": 12, "test-examples": 4,
                                                             "held-version": 0}),
                                       "metrics": MetricRecord({"num-examples": 12})}), reply_to=msg)
        self.jobs += 1
        if self.behaviour == "timeout":
            return None
        if self.behaviour == "flower_error":
            return Message(Error(code=2, reason="ClientApp raised"), reply_to=msg)
        if self.behaviour == "crash":
            return Message(RecordDict({"error": ConfigRecord({"code": "job_failed",
                                                              "reason": "RuntimeError: boom"})}), reply_to=msg)
        cfg = msg.content["config"]
        assert cfg["profile"] == self.profile and cfg["batch-size"] == 4
        ins = decode_instruction({k: v.numpy() for k, v in msg.content["arrays"].items()}, json.loads(cfg["header"]))
        assert mtype == ("evaluate" if ins.job == "eval" else "train")
        assert ("learn" in cfg) == (ins.job == "lsq")
        metrics = {"num-examples": 12, "wall_s": 0.01}
        if self.behaviour == "garbage":
            if ins.job == "eval":
                return Message(RecordDict({"metrics": MetricRecord({**metrics, "nll_sum": math.nan, "tokens": 10,
                                                                    "version": ins.version})}), reply_to=msg)
            return Message(RecordDict({"arrays": ArrayRecord({"float32": Array(np.ones(7, np.float32))}),
                                       "config": ConfigRecord({"header": "{not json"}),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)
        if ins.job == "eval":
            err = sum(float(np.abs(p.scale).sum()) for p in ins.qparams.points.values())
            return Message(RecordDict({"metrics": MetricRecord({**metrics, "nll_sum": 100.0 + err, "tokens": 80,
                                                                "perplexity": 1.0, "version": ins.version})}),
                           reply_to=msg)
        if ins.job == "scout":
            flat, header = encode_scout_reply(ScoutReply(
                {k: (float(self.acts[k].min()), float(self.acts[k].max())) for k in ins.keys},
                {k: self.acts[k].size for k in ins.keys}), ins)
        elif ins.job == "stats":
            flat, header = encode_stats_reply(StatsReply({k: observe(self.acts[k], ins.grids[k]) for k in ins.keys}), ins)
        else:
            d = 0.01 * (1 + int(self.cid[1:]) % 3) * (-1) ** ins.round
            flat, header = encode_lsq_reply(LsqReply({k: np.float32(d) for k in ins.keys},
                                                     {k: np.float32(d / 10) for k in ins.keys}, 2.0, 1.9), ins)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in flat.items()}),
                                   "config": ConfigRecord({"header": json.dumps(header)}),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)


class FakeGrid:
    """Flower's Grid as far as the strategy uses it; node ids start at ``base`` (a restarted
    fleet gets new node ids), and the grid can die when it is asked to send round ``die_at``."""

    def __init__(self, nodes, base=100, die_at=None):
        self.nodes = {base + i: n for i, n in enumerate(nodes)}
        self.die_at = die_at
        self.sent: list[tuple[str, int, str]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        assert timeout is not None and timeout > 0
        messages = list(messages)
        if self.die_at is not None and any(m.metadata.group_id == str(self.die_at) for m in messages):
            raise ConnectionError("SuperLink went away")
        out = []
        for m in messages:
            self.sent.append((m.metadata.message_type, m.metadata.dst_node_id, m.metadata.group_id))
            r = self.nodes[m.metadata.dst_node_id].handle(m)
            if r is not None:
                out.append(r)
        return out


BEHAVIOUR = {"c08": "garbage", "c09": "crash", "c10": "flower_error", "c11": "timeout"}


def fleet(n=12):
    data = client_data(n)
    names = list(PROFILES)
    return [FakeNode(c, names[i % len(names)], data[c], BEHAVIOUR.get(c, "ok")) for i, c in enumerate(sorted(data))]


def config(**kw):
    base = dict(schedule=[{"job": "scout"}, {"job": "stats", "repeat": 3, "fraction": 0.4, "min_replies": 2},
                          {"job": "lsq", "repeat": 2, "fraction": 0.7, "min_replies": 2},
                          {"job": "eval", "fraction": 1.0}],
                bins=64, grid_quantile=1.0, server_opt="fedadam", server_lr=0.05, lsq_rule="median",
                batch_size=4, seed=5, reply_timeout_s=5.0, min_available=4, wait_s=0.0, learn={"steps": 2})
    return ServerConfig(**{**base, **kw})


def server_eval(profile, qp):
    return {"perplexity": 1.0 + qp.version, "points": len(qp.points)}


def lines(out):
    return [json.loads(x) for x in (out / METRICS).read_text().splitlines()]


def same_qparams(a, b):
    assert set(a) == set(b)
    for prof in a:
        assert a[prof].version == b[prof].version, prof
        assert set(a[prof].points) == set(b[prof].points)
        for k, p in a[prof].points.items():
            q = b[prof].points[k]
            assert p.scale.tobytes() == q.scale.tobytes() and p.zero_point.tobytes() == q.zero_point.tobytes(), (prof, k)
            assert p.zero_point.dtype == q.zero_point.dtype


# ---------------------------------------------------------------------------------------------

def test_run_writes_one_metrics_line_per_round_and_counts_every_rejection(tmp_path):
    grid = FakeGrid(fleet())
    seen = []
    final = run_server(grid, config(), make_initial(), tmp_path, evaluate_fn=server_eval, on_round=seen.append)
    rows = lines(tmp_path)
    assert [r["round"] for r in rows] == list(range(1, 8)) and [r["round"] for r in seen] == list(range(1, 8))
    assert [r["job"] for r in rows] == ["scout", "stats", "stats", "stats", "lsq", "lsq", "eval"]
    scout = rows[0]
    assert scout["sampled"] == 12 and scout["replies"] == 8
    assert scout["rejections"] == {"client:job_failed": 1, "flower_error": 1, "malformed": 1, "timeout": 1}
    assert scout["roster"] == 12 and scout["roster_joined"] == 12
    for r in rows:
        assert sum(r["rejections"].values()) + r["replies"] == r["sampled"]
        per_profile = {}
        for counts in r["rejections_by_profile"].values():
            for code, n in counts.items():
                per_profile[code] = per_profile.get(code, 0) + n
        assert per_profile == r["rejections"]
        assert r["bytes_down_per_client"] > 0 and r["wall_s"] >= 0
        assert set(r["versions"]) == set(PROFILES)
    # stats rounds sample without replacement among the clients that have not contributed yet;
    # the misbehaving four are never marked used, so they stay eligible
    assert [r["sampled"] for r in rows[1:4]] == [5, 5, 4]
    assert rows[1]["bytes_up_per_client"] > rows[4]["bytes_up_per_client"] > 0   # histograms > deltas
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt.round == 7 and set(ckpt.used) == {f"c{i:02d}" for i in range(8)}
    assert all(ckpt.qparams[p].version == final[p].version for p in PROFILES)
    assert final["u8"].version >= 3          # stats calibrated it, two lsq rounds moved it
    ev = rows[-1]
    assert ev["rejections"] == {"client:job_failed": 1, "flower_error": 1, "nan": 1, "timeout": 1}
    assert set(ev["eval"]) == set(PROFILES) and ev["eval_all"]["tokens"] == 8 * 80
    assert ev["server_eval"] == {p: server_eval(p, final[p]) for p in PROFILES}
    # hello goes once to each node, not once per round
    queries = [s for s in grid.sent if s[0] == "query"]
    assert len(queries) == 12 and len({q[1] for q in queries}) == 12
    assert sum(n.jobs for n in grid.nodes.values()) == sum(r["sampled"] for r in rows)


@pytest.mark.parametrize("how", ["on_round", "grid_dies"])
def test_an_interrupted_run_resumes_to_the_same_qparams_bit_for_bit(tmp_path, how):
    full = run_server(FakeGrid(fleet()), config(), make_initial(), tmp_path / "full")

    out = tmp_path / "cut"

    def stop_after_5(m):          # after the first lsq round: FedAdam moments must survive
        if m["round"] == 5:
            raise KeyboardInterrupt

    with pytest.raises((KeyboardInterrupt, ConnectionError)):
        if how == "on_round":
            run_server(FakeGrid(fleet()), config(), make_initial(), out, on_round=stop_after_5)
        else:                       # mid-statistics: the running sums and used ids must survive
            run_server(FakeGrid(fleet(), die_at=4), config(), make_initial(), out)
    done = 5 if how == "on_round" else 3
    ckpt = load_checkpoint(out / CHECKPOINT)
    assert ckpt.moments if how == "on_round" else (ckpt.sums and ckpt.used)
    assert ckpt.round == done
    with open(out / METRICS, "a") as f:      # as if the crash came after a later line was written
        f.write(json.dumps({"round": done + 1, "job": "stale"}) + "\n" + '{"round": 9, "cut')
    resumed = run_server(FakeGrid(fleet(), base=500), config(), make_initial(), out)   # new node ids
    same_qparams(full, resumed)
    assert [r["round"] for r in lines(out)] == list(range(1, 8))
    assert all(r["job"] != "stale" for r in lines(out))
    assert states_equal(load_checkpoint(out / CHECKPOINT), load_checkpoint(tmp_path / "full" / CHECKPOINT))
    # a finished run resumes to its result without touching the grid
    idle = FakeGrid([])
    same_qparams(run_server(idle, config(), make_initial(), out), full)
    assert idle.sent == []


def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = config(schedule=[{"job": "scout"}])
    run_server(FakeGrid(fleet()), cfg, make_initial(), tmp_path)
    path = tmp_path / CHECKPOINT
    raw = path.read_bytes()
    with pytest.raises(CheckpointError, match="written by another config"):
        run_server(FakeGrid(fleet()), config(schedule=[{"job": "scout"}], seed=6), make_initial(), tmp_path)
    other = make_initial()
    other["u8"] = other["u8"].with_points({}, version=1)
    with pytest.raises(CheckpointError, match="another config"):
        run_server(FakeGrid(fleet()), cfg, other, tmp_path)
    # waiting knobs may change on resume
    run_server(FakeGrid(fleet()), config(schedule=[{"job": "scout"}], reply_timeout_s=1.0), make_initial(), tmp_path)
    for bad in (raw[: len(raw) // 2], b"not a checkpoint", b""):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors: not a checkpoint \(corrupt or truncated"):
            run_server(FakeGrid(fleet()), cfg, make_initial(), tmp_path)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["state"] = header["__metadata__"]["state"].replace('"grids"', '"gridz"')
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    with pytest.raises(CheckpointError, match="inconsistent run state"):
        load_checkpoint(path)


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = initial_state(make_initial(), "abc")
    save_checkpoint(state, tmp_path / "s.safetensors")
    back = load_checkpoint(tmp_path / "s.safetensors", expect_digest="abc")
    assert states_equal(state, back)
    assert back.qparams["u8"].points[KEYS[0]].scale.shape == ()            # scalars stay scalars
    assert not list(tmp_path.glob(".*.tmp"))                               # no temp file left behind


def test_waits_for_min_available_nodes(tmp_path):
    class Late(FakeGrid):
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return list(self.nodes)[: 2 if self.calls < 3 else None]

    grid = Late(fleet())
    assert wait_for_nodes(grid, 10, wait_s=5.0, poll_s=0.01) == 12 and grid.calls == 3
    with pytest.raises(TimeoutError, match="only 2 of min_available=10"):
        wait_for_nodes(Late(fleet()), 10, wait_s=0.0)
    with pytest.raises(TimeoutError):
        run_server(FakeGrid(fleet(3)), config(), make_initial(), tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_node_joining_later_is_asked_once_and_sampled(tmp_path):
    nodes = fleet(13)
    grid = FakeGrid(nodes[:12])
    late = nodes[12]

    def join(m):
        if m["round"] == 2:
            grid.nodes[999] = late

    run_server(grid, config(), make_initial(), tmp_path, on_round=join)
    assert [s for s in grid.sent if s[0] == "query" and s[1] == 999] == [("query", 999, "")]
    assert late.jobs > 0 and lines(tmp_path)[2]["roster_joined"] == 1


def test_rounds_sampled_by_profile_ask_each_profile_for_its_fraction(tmp_path):
    # 12 nodes, 4 per profile; lsq rounds take ceil(0.25 x 4) = 1 of each profile, never 3 of one
    nodes = [FakeNode(n.cid, n.profile, n.acts) for n in fleet(12)]    # every node behaves
    grid = FakeGrid(nodes)
    cfg = config(schedule=[{"job": "scout"}, {"job": "stats", "min_replies": 2},
                           {"job": "lsq", "repeat": 6, "fraction": 0.25, "by_profile": True}])
    run_server(grid, cfg, make_initial(), tmp_path)
    profile_of = {nid: n.profile for nid, n in grid.nodes.items()}
    for r in range(3, 9):
        asked = sorted(profile_of[s[1]] for s in grid.sent if s[0] == "train" and s[2] == str(r))
        assert asked == sorted(set(profile_of.values())), r
    assert len(set(profile_of.values())) == 3
    # so every profile's ranges move in every lsq round
    versions = [lines(tmp_path)[r - 1]["versions"] for r in range(2, 9)]
    for before, after in zip(versions, versions[1:]):
        assert all(after[p] == before[p] + 1 for p in PROFILES), (before, after)


def test_a_round_for_one_profile_asks_only_its_nodes_and_moves_only_its_ranges(tmp_path):
    nodes = [FakeNode(n.cid, n.profile, n.acts) for n in fleet(12)]
    grid = FakeGrid(nodes)
    one = sorted(PROFILES)[0]
    cfg = config(schedule=[{"job": "scout"}, {"job": "stats", "min_replies": 2},
                           {"job": "lsq", "fraction": 1.0, "profiles": [one]}])
    run_server(grid, cfg, make_initial(), tmp_path)
    profile_of = {nid: n.profile for nid, n in grid.nodes.items()}
    asked = [profile_of[s[1]] for s in grid.sent if s[0] == "train" and s[2] == "3"]
    assert asked == [one] * 4
    before, after = lines(tmp_path)[1]["versions"], lines(tmp_path)[2]["versions"]
    assert after == {p: v + (p == one) for p, v in before.items()}

    # its fraction is of that profile's 4 clients: ceil(0.5 x 4) = 2 every round, never none (a
    # fraction of the whole roster of 12 drew 6, sometimes none of them of the profile)
    cfg = config(schedule=[{"job": "scout"}, {"job": "stats", "min_replies": 2},
                           {"job": "lsq", "repeat": 6, "fraction": 0.5, "profiles": [one]}])
    grid = FakeGrid([FakeNode(n.cid, n.profile, n.acts) for n in fleet(12)])
    run_server(grid, cfg, make_initial(), tmp_path / "fraction")
    profile_of = {nid: n.profile for nid, n in grid.nodes.items()}
    for r in range(3, 9):
        assert [profile_of[s[1]] for s in grid.sent if s[0] == "train" and s[2] == str(r)] == [one] * 2, r

    from server.strategy import FedQuant

    with pytest.raises(ValueError, match=r"schedule\[1\].profiles: no profile named \['nope'\]"):
        FedQuant(config(schedule=[{"job": "scout"}, {"job": "lsq", "profiles": ["nope"]}]), make_initial(), tmp_path)


# --------------------------------------------------------------------------------- the Strategy

def test_fedquant_is_a_flower_strategy_whose_hooks_run_a_round(tmp_path):
    """Driven hook by hook, as Flower's own ``Strategy.start`` drives a strategy, the first round
    gives the same run state as the schedule run by ``start``."""
    from flwr.serverapp.strategy import Strategy

    from server.strategy import FedQuant

    cfg = config(schedule=[{"job": "scout"}, {"job": "stats", "fraction": 1.0, "min_replies": 2}])
    strategy = FedQuant(cfg, make_initial(), tmp_path / "hooks")
    assert isinstance(strategy, Strategy)
    grid = FakeGrid(fleet())
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        assert len(messages) == 12 and {m.metadata.message_type for m in messages} == {"train"}
        arrays, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages, timeout=5.0))
        assert arrays is None and metrics["replies"] == 8 and metrics["rejected"] == 4
        assert metrics["applied"] == 1
    whole = FedQuant(cfg, make_initial(), tmp_path / "start")
    result = whole.start(FakeGrid(fleet()))
    assert states_equal(strategy.state, whole.state)
    assert sorted(result.train_metrics_clientapp) == [1, 2] and not result.evaluate_metrics_clientapp


def test_start_returns_flowers_result_with_each_kind_of_round(tmp_path):
    from server.strategy import FedQuant

    result = FedQuant(config(), make_initial(), tmp_path, evaluate_fn=server_eval).start(FakeGrid(fleet()))
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5, 6]
    assert sorted(result.evaluate_metrics_clientapp) == [7] and sorted(result.evaluate_metrics_serverapp) == [7]
    assert result.train_metrics_clientapp[1]["replies"] == 8
    assert set(result.evaluate_metrics_serverapp[7]) == {f"{p}.perplexity" for p in PROFILES}


def test_the_server_app_finds_its_setup_in_the_run_config():
    from server.app import load_setup, setup_from_run_config

    assert load_setup("server.app:run_server").__name__ == "run_server"
    with pytest.raises(ValueError, match="must be 'module:function'"):
        load_setup("server.app")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_setup("server.nope:setup")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_setup("server.app:nope")
    with pytest.raises(ValueError, match="has no 'setup'"):
        setup_from_run_config({"config": "configs/default.toml"})


def test_the_pyproject_names_the_server_and_client_apps_of_server_and_client():
    import tomllib
    from pathlib import Path

    from server.app import load_setup

    app = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:server_app", "clientapp": "client.app:app"}
    assert callable(load_setup(app["config"]["setup"]))


def test_a_round_where_most_replies_fail_is_reported_loudly(tmp_path):
    """Workers killed for memory show only as flower_error: a round where most sampled clients
    failed carries an alert with the causes, and the summary lists it; a healthy round does not."""
    from server.strategy import most_failed
    from server.validate import Rejection

    nodes = fleet(12)                   # c08..c11 misbehave already (garbage, crash, flower_error, timeout)
    for n in nodes[:4]:
        n.behaviour = "flower_error"
    run_server(FakeGrid(nodes), config(schedule=[{"job": "scout"}, {"job": "stats", "fraction": 1.0}]),
               make_initial(), tmp_path)
    scout, stats = lines(tmp_path)
    assert scout["replies"] == 4
    assert scout["alert"] == "8 of 12 replies failed: flower_error 5, client:job_failed 1, malformed 1, timeout 1"
    assert "alert" not in run_server_lines(tmp_path / "healthy")
    assert most_failed(12, [Rejection("timeout", "")] * 6) is None          # half is not most
    assert most_failed(0, []) is None


def test_the_round_line_and_summary_say_when_most_replies_failed(tmp_path):
    from types import SimpleNamespace

    from simulation.cli import _round_line
    from simulation.report import summarise

    m = {"round": 2, "job": "stats", "replies": 1, "sampled": 3, "wall_s": 1.0,
         "rejections": {"flower_error": 2}, "alert": "2 of 3 replies failed: flower_error 2"}
    assert "ALERT: 2 of 3 replies failed: flower_error 2" in " ".join(_round_line(m).split())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "job": "scout"}) + "\n" + json.dumps(m) + "\n")
    prep = SimpleNamespace(out=tmp_path, initial={}, clients=[], about={}, prepare_s=0.0,
                           cfg=SimpleNamespace(name="x", model="tiny", server=config(schedule=[{"job": "scout"}])))
    summary = summarise(prep, {}, {}, 1.0)
    assert summary["alerts"] == [{"round": 2, "job": "stats", "alert": m["alert"]}]
    assert summary["privacy"] == {"dp": None, "statistics": "in the clear", "scouting": "in the clear"}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "job": "scout"}) + "\n")
    assert "alerts" not in summarise(prep, {}, {}, 1.0)


def run_server_lines(out):
    """The metrics lines of a scout round on the usual fleet (4 of 12 misbehave: no alert)."""
    run_server(FakeGrid(fleet(12)), config(schedule=[{"job": "scout"}]), make_initial(), out)
    return lines(out)[0]

"""The server loop over Flower's Grid (design.md sections 4, 7, 8; plan/protocol.md).

``run_server(grid, config, initial, out_dir)`` runs the schedule of ``config`` from the initial
QParams of each device profile and returns the final ones. Flower is used only here, and only for
messaging: ``grid.get_node_ids()``, ``grid.send_and_receive(...)`` and ``Message``. The round logic
is ``server.rounds`` (pure), the checks ``server.validate``, the state ``server.state``.

Per run: wait until ``min_available`` nodes are connected (Flower's FedAvg samples before it
waits), resume from ``out_dir/checkpoint.safetensors`` when present. Per round: ask only the nodes
not yet in the roster for their hello info (client id, profile), sample client ids, send each
sampled node its profile's instruction, validate each reply (a missing, failed, refused or garbage
reply is dropped with a code, never fails the round), apply the round, checkpoint atomically, then
append one line to ``out_dir/metrics.jsonl``. A resumed run drops the metrics lines of rounds after
its checkpoint, so the file has one line per round done.

Flower 1.42 builds a Message's metadata from ``flwr.supercore.task_identity.TaskIdentity``, which
Flower sets when it runs a ServerApp; a caller outside a ServerApp (a test) must set it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from quant.qparams import QParams, atomic_write_bytes
from quant.wire import Instruction, encode_instruction, payload_nbytes
from server.config import ServerConfig
from server.rounds import Accepted, apply_round, instructions_for, sample_by_profile, sample_clients
from server.state import initial_state, load_checkpoint, run_digest, save_checkpoint
from server.validate import (Rejection, summarise_rejections, validate_eval_metrics, validate_lsq_reply,
                             validate_scout_reply, validate_stats_reply)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
CLIENT_CODES = frozenset({"unknown_profile", "bad_instruction", "stale_version", "unknown_job",
                          "patch_refused", "memory_budget", "no_data", "job_failed",
                          "unavailable", "dropout"})   # the last two: simulated unreliable devices
MAX_HELLO_TRIES = 3
MESSAGE_TYPE = {"scout": "train", "stats": "train", "lsq": "train", "eval": "evaluate"}
VALIDATORS = {"scout": validate_scout_reply, "stats": validate_stats_reply, "lsq": validate_lsq_reply}

EvaluateFn = Callable[[str, QParams], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------
# Roster: client id -> node, learned once per node from its hello reply

@dataclass
class Member:
    client_id: str
    node_id: int
    profile: str
    train_examples: int
    test_examples: int


@dataclass
class Roster:
    members: dict[str, Member] = field(default_factory=dict)    # client id -> member
    nodes: dict[int, str] = field(default_factory=dict)         # node id -> client id
    failed: dict[int, int] = field(default_factory=dict)        # node id -> failed hellos

    def online(self, node_ids: Iterable[int]) -> list[str]:
        on = set(node_ids)
        return sorted(c for c, m in self.members.items() if m.node_id in on)


def _by_node(replies: Iterable[Message], expected: Iterable[int]) -> dict[int, Message]:
    """The first reply from each node we wrote to (others and duplicates are ignored)."""
    want, out = set(expected), {}
    for m in replies:
        nid = m.metadata.src_node_id
        if nid in want and nid not in out:
            out[nid] = m
    return out


def _hello(msg: Message | None, profiles: Iterable[str]) -> Member | str:
    """The node's info from its hello reply, or why it is not usable."""
    if msg is None:
        return "timeout"
    try:
        if msg.has_error():
            return "flower_error"
        info = msg.content["info"]
        cid, prof = info["client-id"], info["profile"]
        train, test = info.get("train-examples", 0), info.get("test-examples", 0)
        if not (isinstance(cid, str) and 0 < len(cid) <= 256):
            return "bad client-id"
        if prof not in set(profiles):
            return f"unknown profile {str(prof)[:60]!r}"
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (train, test)):
            return "bad example counts"
        return Member(cid, msg.metadata.src_node_id, prof, train, test)
    except Exception as e:
        return f"malformed ({type(e).__name__})"


def refresh_roster(grid, roster: Roster, profiles: Iterable[str], timeout: float) -> dict:
    """Ask the connected nodes that are not in the roster yet for their hello info. A node whose
    hello fails is asked again in later rounds, at most ``MAX_HELLO_TRIES`` times; a node with an
    unknown profile, or claiming the id of another connected node, is not asked again."""
    profiles = list(profiles)
    online = {int(n) for n in grid.get_node_ids()}
    new = sorted(n for n in online if n not in roster.nodes and roster.failed.get(n, 0) < MAX_HELLO_TRIES)
    if not new:
        return {"online": len(online), "joined": 0, "hello_failed": 0}
    msgs = [Message(RecordDict({"config": ConfigRecord({"fedquant": "hello"})}), dst_node_id=n,
                    message_type="query") for n in new]
    replies = _by_node(grid.send_and_receive(msgs, timeout=timeout), new)
    joined = failed = 0
    for n in new:
        m = _hello(replies.get(n), profiles)
        if isinstance(m, Member):
            old = roster.members.get(m.client_id)
            if old is not None and old.node_id != n and old.node_id in online:
                m = f"client-id {m.client_id!r} already held by connected node {old.node_id}"
        if isinstance(m, str):
            failed += 1
            permanent = m.startswith(("unknown profile", "client-id", "bad"))
            roster.failed[n] = MAX_HELLO_TRIES if permanent else roster.failed.get(n, 0) + 1
            log.warning("node %s left out of the roster: %s", n, m)
            continue
        old = roster.members.get(m.client_id)
        if old is not None:
            roster.nodes.pop(old.node_id, None)         # the client came back on another node
        roster.members[m.client_id] = m
        roster.nodes[n] = m.client_id
        joined += 1
    return {"online": len(online), "joined": joined, "hello_failed": failed}


def wait_for_nodes(grid, n: int, wait_s: float, poll_s: float = 1.0) -> int:
    """Block until ``n`` nodes are connected; raise TimeoutError after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= n:
            return have
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"only {have} of min_available={n} nodes connected after wait_s={wait_s}s")
        time.sleep(min(poll_s, left))


# ---------------------------------------------------------------------------------------------
# Messages

def instruction_message(node_id: int, profile: str, ins: Instruction, flat, header, config: ServerConfig) -> Message:
    """The message of protocol.md for one sampled node."""
    cfg = {"header": json.dumps(header), "profile": profile, "batch-size": int(config.batch_size)}
    if ins.job == "lsq":
        cfg["learn"] = json.dumps(config.learn, sort_keys=True)
    content = RecordDict({"arrays": ArrayRecord({dt: Array(a) for dt, a in flat.items()}),
                          "config": ConfigRecord(cfg)})
    return Message(content, dst_node_id=int(node_id), message_type=MESSAGE_TYPE[ins.job],
                   group_id=str(ins.round))


def read_reply(msg: Message | None, ins: Instruction, config: ServerConfig) -> tuple[Any, int, int]:
    """``(decoded reply or Rejection, num-examples, payload bytes)`` of one node's reply.
    Never raises: whatever a client sends costs at most its own reply."""
    if msg is None:
        return Rejection("timeout", "no reply before reply_timeout_s"), 0, 0
    nbytes = 0
    try:
        if msg.has_error():
            return Rejection("flower_error", str(msg.error.reason)[:300]), 0, 0
        content = msg.content
        if "error" in content:
            rec = content["error"]
            code = rec.get("code")
            code = code if code in CLIENT_CODES else "other"
            return Rejection(f"client:{code}", str(rec.get("reason"))[:300]), 0, 0
        metrics = dict(content["metrics"]) if "metrics" in content else {}
        n = metrics.get("num-examples")
        if ins.job == "eval":
            r = validate_eval_metrics(metrics, ins, config.validation)
        else:
            flat = {k: v.numpy() for k, v in content["arrays"].items()}
            header = content["config"]["header"]
            nbytes = payload_nbytes(flat, header if isinstance(header, str) else "")
            r = VALIDATORS[ins.job](flat, header, ins, n, config.validation)
        return r, (0 if isinstance(r, Rejection) else int(n)), nbytes
    except Exception as e:          # a reply that does not even have the protocol's shape
        return Rejection("malformed", f"{type(e).__name__}: {str(e)[:300]}"), 0, nbytes


# ---------------------------------------------------------------------------------------------
# Files

def _trim_metrics(path: Path, upto: int) -> None:
    """Keep the metrics lines of rounds ``<= upto`` (a resumed run redoes the later ones)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue                # a line cut by a crash
        if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= upto:
            keep.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def _plain(x):
    """JSON-safe: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _append_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_plain(row), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------

def run_server(grid, config: ServerConfig, initial: Mapping[str, QParams], out_dir, *,
               evaluate_fn: EvaluateFn | None = None,
               on_round: Callable[[dict], None] | None = None,
               weights: Mapping[str, Any] | None = None) -> dict[str, QParams]:
    """Run (or resume) the schedule of ``config`` on ``grid`` and return the final QParams per
    profile. ``evaluate_fn(profile, qparams) -> metrics`` runs on eval rounds (server-side
    evaluation); ``on_round(metrics)`` is called after each round's checkpoint and metrics line;
    ``weights`` (Linear path -> float weight) are needed when ``config.smoothing`` is set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_path = out / CHECKPOINT, out / METRICS
    digest = run_digest(config.digest(), initial)
    if ckpt.exists():
        state = load_checkpoint(ckpt, expect_digest=digest)
        if set(state.qparams) != set(initial):
            raise ValueError(f"{ckpt}: profiles {sorted(state.qparams)} differ from {sorted(initial)}")
        log.info("resuming after round %d from %s", state.round, ckpt)
    else:
        state = initial_state(initial, digest)
    if config.smoothing is not None and weights is None:
        raise ValueError("config.smoothing is set: run_server needs the float weights (weights=...)")
    _trim_metrics(metrics_path, state.round)
    schedule = [(r, spec) for r, spec in config.rounds() if r > state.round]
    if not schedule:
        return dict(state.qparams)

    wait_for_nodes(grid, config.min_available, config.wait_s)
    roster = Roster()
    for rnd, spec in schedule:
        t0 = time.perf_counter()
        joined = refresh_roster(grid, roster, state.qparams, config.reply_timeout_s)
        online = roster.online(grid.get_node_ids())
        # a client is asked only for what it can do: evaluation needs held-out text, the rest training text
        need = "test_examples" if spec.job == "eval" else "train_examples"
        online = [c for c in online if getattr(roster.members[c], need) > 0]
        used = state.used if spec.job == "stats" else ()
        sampled = sample_by_profile({c: roster.members[c].profile for c in online}, used, spec.fraction,
                                    spec.min_clients, config.seed, rnd) if spec.by_profile else \
            sample_clients(online, used, spec.fraction, spec.min_clients, config.seed, rnd)
        inss = instructions_for(state, rnd, spec, config, weights)
        profiles = sorted({roster.members[c].profile for c in sampled})
        encoded = {p: encode_instruction(inss[p]) for p in profiles}
        down = {p: payload_nbytes(*encoded[p]) for p in profiles}
        messages = [instruction_message(roster.members[c].node_id, roster.members[c].profile,
                                        inss[roster.members[c].profile], *encoded[roster.members[c].profile], config)
                    for c in sampled]
        nodes = [roster.members[c].node_id for c in sampled]
        replies = _by_node(grid.send_and_receive(messages, timeout=config.reply_timeout_s), nodes) \
            if messages else {}

        accepted: dict[str, list[Accepted]] = {p: [] for p in profiles}
        rejections, up, by_profile = [], {p: [] for p in profiles}, {}
        for c in sampled:
            m = roster.members[c]
            r, n, nbytes = read_reply(replies.get(m.node_id), inss[m.profile], config)
            if nbytes:
                up[m.profile].append(nbytes)
            if isinstance(r, Rejection):
                rejections.append(r)
                by_profile.setdefault(m.profile, []).append(r)
                log.info("round %d: reply of %s rejected: %s %s", rnd, c, r.code, r.detail[:200])
            else:
                accepted[m.profile].append(Accepted(c, n, r))

        state, metrics = apply_round(state, rnd, spec, accepted, rejections, config, weights)
        if spec.job == "eval" and evaluate_fn is not None:
            metrics["server_eval"] = {p: dict(evaluate_fn(p, qp)) for p, qp in sorted(state.qparams.items())}
        n_down = {p: [down[p] for c in sampled if roster.members[c].profile == p] for p in profiles}
        all_down, all_up = sum(n_down.values(), []), sum(up.values(), [])
        metrics |= {
            "sampled": len(sampled), "roster": len(online), **{f"roster_{k}": v for k, v in joined.items()},
            "bytes_down_per_client": sum(all_down) / len(all_down) if all_down else 0,
            "bytes_up_per_client": sum(all_up) / len(all_up) if all_up else 0,
            "bytes_down_total": sum(all_down), "bytes_up_total": sum(all_up),
            "rejections_by_profile": {p: summarise_rejections(r) for p, r in sorted(by_profile.items())},
            "bytes": {p: {"down_per_client": sum(n_down[p]) / len(n_down[p]) if n_down[p] else 0,
                          "up_per_client": sum(up[p]) / len(up[p]) if up[p] else 0} for p in profiles},
            "wall_s": time.perf_counter() - t0}
        save_checkpoint(state, ckpt)
        _append_line(metrics_path, metrics)
        log.info("round %d (%s): %d sampled, %d valid, rejections %s, versions %s", rnd, spec.job,
                 len(sampled), metrics["replies"], metrics["rejections"], metrics["versions"])
        if on_round is not None:
            on_round(metrics)
    return dict(state.qparams)

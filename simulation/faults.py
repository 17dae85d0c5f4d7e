"""Faulty devices as Flower ClientApp mods (the real ClientApp knows nothing of them): simulated
unreliable devices (``Unreliable``), and the hostile devices of the fault tests (``Hostile``, below).

A fleet entry's ``availability`` and ``dropout`` say how often its phones are offline in a round or
drop out of a job they started. Flower's simulation engine keeps every node connected, so the mod
answers for a lost device with the client's error record (``unavailable`` / ``dropout``,
docs/protocol.md) instead of keeping the round waiting for its timeout; the server counts it like
any lost reply. In a secure statistics round (SecAgg+) the lost device raises instead, so that
Flower answers with an error message, as for a node that vanished mid-protocol: the protocol then
removes its masks from the sum with its neighbours' shares. Draws depend only on (seed, partition
id, round): a resumed run loses the same devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECURE_RECORD

from client.app import error_reply, make_app
from quant.stats import ActivationStats
from quant.wire import (ScoutReply, StatsReply, decode_instruction, decode_scout_reply, decode_stats_reply,
                        encode_scout_reply, encode_stats_reply)


def uniform(*key) -> float:
    """A deterministic draw in [0, 1) from ``key`` (sha256: the same in every process and run)."""
    h = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class Unreliable:
    """The mod: ``rates[partition id] = (availability, dropout)``. Picklable, since Flower sends
    the ClientApp (mods included) to every simulation actor."""

    rates: dict[str, tuple[float, float]]
    seed: int

    def lost(self, message_type: str, content, node_config):
        """The error record a lost device answers ``content`` with, or None to let it through."""
        if message_type == "query":
            return None
        pid = str(node_config.get("partition-id"))
        availability, dropout = self.rates.get(pid, (1.0, 0.0))
        try:
            rnd = json.loads(content["config"]["header"])["round"]
        except Exception:       # not an instruction: let the device answer it
            return None
        if uniform(self.seed, "availability", pid, rnd) >= availability:
            return error_reply("unavailable", f"simulated: device {pid} is offline in round {rnd}")
        if uniform(self.seed, "dropout", pid, rnd) < dropout:
            return error_reply("dropout", f"simulated: device {pid} dropped out of round {rnd}")
        return None

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        content = self.lost(msg.metadata.message_type.split(".")[0], msg.content, context.node_config)
        if content is None:
            return call_next(msg, context)
        if SECURE_RECORD in msg.content.config_records:      # mid-SecAgg+: the device is gone
            raise DeviceLost(content["error"]["reason"])
        return Message(content=content, reply_to=msg)


class DeviceLost(RuntimeError):
    """A simulated device that vanished in the middle of a secure round (Flower reports an error)."""




def unreliable_for(prep) -> Unreliable | None:
    """The mod of a prepared run (``simulation.prepare.Prepared``), or None if every device is
    reliable."""
    by_profile = {e.load().name: (e.availability, e.dropout) for e in prep.cfg.fleet}
    rates = {str(c.pid): by_profile[c.profile] for c in prep.clients if by_profile[c.profile] != (1.0, 0.0)}
    return Unreliable(rates, prep.cfg.data.seed) if rates else None


# ------------------------------------------------------------------------------ hostile devices

FAULTS = ("exit", "raise", "hang", "poison")
EXIT_CODE = 86                      # what an injected crash exits with (to find it in the logs)
POISON_RANGE = 1e4                  # the poisoned min/max: far outside any honest activation
POISON_ABSMAX = 1e6                 # the poisoned per-channel abs-max (SmoothQuant's statistic)


def fault_rounds(node_config) -> set[int] | None:
    """The rounds node config ``fault-rounds`` names (``3`` or ``"1,3"``: Flower splits
    ``--node-config`` on spaces), or None for every round."""
    spec = node_config.get("fault-rounds")
    if spec in (None, ""):
        return None
    try:
        return {int(r) for r in str(spec).split(",") if r.strip()}
    except ValueError:
        raise ValueError(f"node config fault-rounds={spec!r}: a round number or comma-separated "
                         "round numbers") from None


def poison(content: RecordDict, ins) -> RecordDict:
    """The node's own OK reply to ``ins`` with its statistics made extreme but well-formed, so it
    passes the server's validation: ``scout``: min/max at -/+POISON_RANGE and every abs-max at
    POISON_ABSMAX; ``stats``: every value below or above the grid, min/max at -/+POISON_RANGE,
    abs-max at POISON_ABSMAX. Error replies, ``lsq`` and ``eval`` replies pass unchanged."""
    if "error" in content or ins.job not in ("scout", "stats"):
        return content
    flat = {k: v.numpy() for k, v in content["arrays"].items()}
    header = content["config"]["header"]
    absmax = {k: np.full(c, POISON_ABSMAX, np.float32) for k, c in ins.absmax.items()}
    if ins.job == "scout":
        r = decode_scout_reply(flat, header, ins)
        ranges = {k: ((-POISON_RANGE, POISON_RANGE) if r.n[k] > 0 else r.ranges[k]) for k in ins.keys}
        new_flat, new_header = encode_scout_reply(ScoutReply(ranges, dict(r.n), absmax), ins)
    else:
        r = decode_stats_reply(flat, header, ins)
        stats = {}
        for k, s in r.stats.items():
            if s.n < 2:         # a single value cannot lie below and above: keep it
                stats[k] = s
                continue
            stats[k] = ActivationStats(s.grid, np.zeros_like(s.counts), below=s.n // 2, above=s.n - s.n // 2,
                                       min=-POISON_RANGE, max=POISON_RANGE, n=s.n)
        new_flat, new_header = encode_stats_reply(StatsReply(stats, absmax), ins)
    return RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new_flat.items()}),
                       "config": ConfigRecord({"header": json.dumps(new_header)}),
                       "metrics": content["metrics"]})


@dataclass(frozen=True)
class Hostile:
    """A ClientApp mod that makes a node misbehave in its jobs as node config ``fault`` says (the
    real ClientApp, client/app.py, knows nothing of it; the fault tests' app is ``hostile_app``):

    - ``exit``: the ClientApp process dies in the middle of the job (``os._exit``), no reply;
    - ``raise``: the job raises (Flower answers with its own error message);
    - ``hang``: the job sleeps ``hang-s`` seconds (node config, default 3600) before answering;
    - ``poison``: the job answers with well-formed but extreme statistics (``poison``).

    Only job messages (``train``, ``evaluate``) in the rounds of ``fault-rounds`` (default: every
    round) are touched; the hello always gets through, so the node joins the roster."""

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        cfg = context.node_config
        fault = cfg.get("fault")
        if not fault or msg.metadata.message_type.split(".")[0] == "query":
            return call_next(msg, context)
        if fault not in FAULTS:
            raise ValueError(f"node config fault={fault!r}: one of {', '.join(FAULTS)}")
        rounds = fault_rounds(cfg)
        rnd = int(msg.metadata.group_id) if str(msg.metadata.group_id).isdigit() else None
        if rounds is not None and rnd not in rounds:
            return call_next(msg, context)
        who = f"node {cfg.get('partition-id')} in round {rnd}"
        if fault == "exit":
            print(f"injected fault: {who}: the ClientApp exits with {EXIT_CODE}", flush=True)
            os._exit(EXIT_CODE)
        if fault == "raise":
            raise RuntimeError(f"injected fault: {who} raised")
        if fault == "hang":
            time.sleep(float(cfg.get("hang-s", 3600)))
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        ins = decode_instruction({k: v.numpy() for k, v in msg.content["arrays"].items()},
                                 json.loads(msg.content["config"]["header"]))
        return Message(content=poison(reply.content, ins), reply_to=msg)


hostile_app = make_app(mods=[Hostile()])
"""The fault tests' ClientApp: ``client.app``'s app logic behind the ``Hostile`` mod
(``server.fleet.deployment.submit_run(..., clientapp="simulation.faults:hostile_app")``)."""

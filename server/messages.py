"""The server's side of the wire (docs/protocol.md): the instruction message one sampled node
gets, and what its reply is worth after validation.

``read_reply`` never raises: whatever a client sends costs at most its own reply, which becomes a
``Rejection`` with a code (the client's own error codes are kept as ``client:<code>``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from quant.wire import Instruction, payload_nbytes
from server.config import ServerConfig
from server.validate import (Rejection, validate_dp_reply, validate_eval_metrics, validate_hessian_reply,
                             validate_lsq_reply, validate_plan_reply, validate_scout_reply, validate_stats_reply)

CLIENT_CODES = frozenset({"unknown_profile", "bad_instruction", "stale_version", "unknown_job",
                          "patch_refused", "memory_budget", "no_data", "job_failed",
                          "unavailable", "dropout"})   # the last two: simulated unreliable devices
MESSAGE_TYPE = {"scout": "train", "stats": "train", "lsq": "train", "plan": "train", "hessian": "train",
                "eval": "evaluate"}
VALIDATORS = {"scout": validate_scout_reply, "stats": validate_stats_reply, "lsq": validate_lsq_reply,
              "plan": validate_plan_reply, "hessian": validate_hessian_reply}


def instruction_message(node_id: int, profile: str, ins: Instruction, flat, header, config: ServerConfig,
                        dp_noise_share: float | None = None, scout_bounds: np.ndarray | None = None) -> Message:
    """The job message of docs/protocol.md for one sampled node (``dp_noise_share``: the client's
    share of the DP noise in a secure statistics round, ``server.privacy.secure_noise_share``;
    ``scout_bounds``: pass 2 of a private scouting round, ``quant.private_scout``, whose pass 1 is
    the same message without them)."""
    cfg = {"header": json.dumps(header), "profile": profile, "batch-size": int(config.batch_size)}
    records = {}
    if ins.job == "scout" and config.secure is not None and config.secure.scout:   # the reply is then one SecAgg+ vector
        cfg["secure-scout"] = 1 if scout_bounds is None else 2
        if scout_bounds is not None:
            records["scout-bounds"] = ArrayRecord({"bounds": Array(np.asarray(scout_bounds, dtype=np.float32))})
    if ins.job == "lsq":
        cfg["learn"] = config.learn_json()
    if ins.job == "stats" and config.secure is not None:
        cfg["secure-cap"] = int(config.secure.cap)      # the reply is then one SecAgg+ vector
    if ins.job == "stats" and config.dp is not None:   # the reply is then one clipped range vector
        cfg["dp-clip"] = config.dp_clip(ins.round)
        cfg["dp-calibrator"] = config.calibrator_for(profile).model_dump_json()
        if config.secure is not None:
            if dp_noise_share is None:
                raise ValueError("a secure DP statistics round needs each client's noise share")
            cfg["dp-noise-share"] = float(dp_noise_share)
    content = RecordDict({"arrays": ArrayRecord({dt: Array(a) for dt, a in flat.items()}),
                          "config": ConfigRecord(cfg), **records})
    return Message(content, dst_node_id=int(node_id), message_type=MESSAGE_TYPE[ins.job],
                   group_id=str(ins.round))


def read_reply(msg: Message | None, ins: Instruction, config: ServerConfig) -> tuple[Any, int, int]:
    """``(decoded reply or Rejection, num-examples, payload bytes)`` of one node's reply."""
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
            if ins.job == "stats" and config.dp is not None:
                r = validate_dp_reply(flat, header, ins, n, config.dp_clip(ins.round), config.validation)
            else:
                r = VALIDATORS[ins.job](flat, header, ins, n, config.validation)
        return r, (0 if isinstance(r, Rejection) else int(n)), nbytes
    except Exception as e:          # a reply that does not even have the protocol's shape
        return Rejection("malformed", f"{type(e).__name__}: {str(e)[:300]}"), 0, nbytes

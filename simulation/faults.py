"""Simulated unreliable devices, as a Flower ClientApp mod (the real ClientApp knows nothing of it).

A fleet entry's ``availability`` and ``dropout`` say how often its phones are offline in a round or
drop out of a job they started. Flower's simulation engine keeps every node connected, so the mod
answers for a lost device with the client's error record (``unavailable`` / ``dropout``,
docs/protocol.md) instead of keeping the round waiting for its timeout; the server counts it like
any lost reply. Draws depend only on (seed, partition id, round): a resumed run loses the same
devices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from flwr.app import Context, Message

from client.app import error_reply


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
        return call_next(msg, context) if content is None else Message(content=content, reply_to=msg)


def unreliable_for(prep) -> Unreliable | None:
    """The mod of a prepared run (``simulation.prepare.Prepared``), or None if every device is
    reliable."""
    by_profile = {e.load().name: (e.availability, e.dropout) for e in prep.cfg.fleet}
    rates = {str(c.pid): by_profile[c.profile] for c in prep.clients if by_profile[c.profile] != (1.0, 0.0)}
    return Unreliable(rates, prep.cfg.data.seed) if rates else None

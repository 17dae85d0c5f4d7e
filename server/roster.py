"""Who is in the fleet: client id -> node, learned once per node from its hello reply
(docs/protocol.md, "hello").

Flower knows nodes; fedquant samples *clients* (a phone's data, its device profile), so a resumed
or restarted node keeps its place in the sampling. A node answers one ``query`` message with its
client id, profile and example counts; a node whose hello fails is asked again in later rounds, at
most ``MAX_HELLO_TRIES`` times.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from flwr.app import ConfigRecord, Message, RecordDict

log = logging.getLogger(__name__)

MAX_HELLO_TRIES = 3


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


def first_reply_by_node(replies: Iterable[Message], expected: Iterable[int]) -> dict[int, Message]:
    """The first reply from each node we wrote to (others and duplicates are ignored)."""
    want, out = set(expected), {}
    for m in replies:
        nid = m.metadata.src_node_id
        if nid in want and nid not in out:
            out[nid] = m
    return out


def read_hello(msg: Message | None, profiles: Iterable[str]) -> Member | str:
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
    replies = first_reply_by_node(grid.send_and_receive(msgs, timeout=timeout), new)
    joined = failed = 0
    for n in new:
        m = read_hello(replies.get(n), profiles)
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

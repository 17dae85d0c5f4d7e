"""Secure aggregation of a statistics round: Flower's SecAgg+ workflow, run per device profile.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020)
masks each client's vector with pairwise and private masks that cancel in the sum; Shamir shares
of the masks let the server remove those of clients that drop out after sending, as long as
enough neighbours answer. The server learns only the sum of the vectors of the clients that sent
one (docs/privacy.md).

Flower 1.42 ships it as ``SecAggPlusWorkflow`` for its legacy Strategy API (``LegacyContext``,
``configure_fit``/``aggregate_fit``). This module drives it from the Message-API strategy of
``server.strategy`` with the smallest adapter that API needs: a legacy strategy whose
``configure_fit`` names the sampled nodes and whose ``aggregate_fit`` keeps the aggregate, and a
workflow whose setup step replaces Flower's FitIns contents by this round's instruction
messages (the clients' ``secure_aggregation_mod`` hands them to the ClientApp at the masked-vector
step). Each client's vector has weight 1, so the workflow's weighted mean times the number of
clients that sent a vector is their sum.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp import Grid

from server.config import SecureConfig

log = logging.getLogger(__name__)


@dataclass
class SecureSum:
    """What one secure aggregation gives the server: the sum of the vectors of ``contributors``
    (node ids), or None when the protocol stopped (too few clients, or too few answered a step:
    ``reason``); and the payload bytes each node was sent and sent back over all the protocol's
    steps (``bytes_down``, ``bytes_up``: node id -> bytes), and the seconds of each step's exchange
    with the clients and of the whole protocol (``step_s``, ``protocol_s``: the rest is the server's
    own work between steps)."""

    total: np.ndarray | None
    contributors: list[int] = field(default_factory=list)
    reason: str = ""
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)
    protocol_s: float = 0.0


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: array bytes, and the config records' values (bytes and strings
    at their length, numbers at 8 bytes); Flower's own framing is not counted."""
    total = 0
    for rec in content.array_records.values():
        total += sum(int(np.asarray(a.numpy()).nbytes) for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            for x in (v if isinstance(v, list) else [v]):
                total += len(x) if isinstance(x, (bytes, str)) else 8
    for rec in content.metric_records.values():
        total += 8 * sum(len(v) if isinstance(v, list) else 1 for v in rec.values())
    return total


class _CountingGrid:
    """The grid, with the payload bytes of every message it sends and receives counted per node,
    and the seconds of each exchange."""

    def __init__(self, grid: Grid):
        self._grid, self.down, self.up, self.seconds = grid, {}, {}, []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            nid = int(m.metadata.dst_node_id)
            self.down[nid] = self.down.get(nid, 0) + content_nbytes(m.content)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.seconds.append(time.perf_counter() - t0)
        for r in replies:
            if not r.has_error():
                nid = int(r.metadata.src_node_id)
                self.up[nid] = self.up.get(nid, 0) + content_nbytes(r.content)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


class _Collect(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow calls: the round's nodes, and the aggregate kept."""

    def __init__(self, proxies: list[GridClientProxy]):
        self.proxies = proxies
        self.mean: np.ndarray | None = None
        self.contributors: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            self.mean = arrays[0] if len(arrays) == 1 else None
            self.contributors = [int(proxy.node_id) for proxy, _ in results]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _InstructionWorkflow(SecAggPlusWorkflow):
    """SecAgg+ whose masked-vector step carries this round's instruction messages."""

    def __init__(self, contents: dict[int, RecordDict], **kw):
        super().__init__(**kw)
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


def secure_tolerance(config: SecureConfig, clients: int) -> float:
    """How far a secure sum's number may lie from the exact sum (in the vectors' units, counts
    divided by ``cap``): each client's number is rounded stochastically to one of
    ``quantization_range`` levels over [-1, 1], so off by less than ``2 / quantization_range``; twice
    that per client, for the float arithmetic around it."""
    return 4.0 * max(clients, 1) / config.quantization_range


def secure_sum(grid: Grid, messages: list[Message], round: int, config: SecureConfig,
               timeout: float) -> SecureSum:
    """Run SecAgg+ over ``messages`` (one instruction message per node, all of one profile, so
    their vectors have one length) and return the sum of the clients' vectors. Never raises for
    what clients do: a protocol that cannot finish returns ``total = None`` with the reason."""
    if len(messages) < 2:
        return SecureSum(None, reason=f"{len(messages)} client(s): a secure sum needs at least 2")
    if len(messages) > config.max_clients():
        return SecureSum(None, reason=f"{len(messages)} clients: the fixed-point sum of more than "
                                      f"{config.max_clients()} overflows modulus_range")
    run_id = 0                      # the workflow's messages get the grid's run; these ids label nothing
    contents = {int(m.metadata.dst_node_id): m.content for m in messages}
    proxies = [GridClientProxy(nid, grid, run_id) for nid in contents]
    strategy = _Collect(proxies)
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round)})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _InstructionWorkflow(
        contents, num_shares=float(config.num_shares), reconstruction_threshold=float(config.reconstruction_threshold),
        max_weight=1.0, clipping_range=1.0, quantization_range=int(config.quantization_range),
        modulus_range=int(config.modulus_range), timeout=config.timeout_s or timeout)
    counting = _CountingGrid(grid)
    traffic = {"bytes_down": counting.down, "bytes_up": counting.up, "step_s": counting.seconds}
    t0 = time.perf_counter()
    try:
        workflow(counting, context)
    except Exception as e:      # noqa: BLE001 -- a client's reply must not stop the run
        log.warning("round %d: secure aggregation raised", round, exc_info=True)
        return SecureSum(None, reason=f"SecAgg+ raised {type(e).__name__}: {e}"[:500], **traffic)
    traffic["protocol_s"] = time.perf_counter() - t0
    if strategy.mean is None:
        return SecureSum(None, reason="SecAgg+ stopped before the sum: too few clients answered a step "
                                      "(Flower's log says which)", **traffic)
    k = len(strategy.contributors)
    return SecureSum(np.asarray(strategy.mean, dtype=np.float64) * k, sorted(strategy.contributors), **traffic)

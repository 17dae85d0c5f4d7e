"""The fedquant ServerApp (``pyproject.toml``: ``serverapp = "server.app:server_app"``).

The app runs the ``server.strategy.FedQuant`` strategy over Flower's Grid. What a run starts from
(its ServerConfig, the initial QParams per device profile, the float weights when it smooths, a
server-side evaluation, what to write at the end) is a ``ServerRun``, made by the run's *setup*:
a function ``setup(run_config) -> ServerRun`` named in the run config as ``setup =
"module:function"``. The project's own setup, ``simulation.flower:setup``, prepares the run
directory of a simulation config (the fleet of ``fedquant fleet`` and ``flwr run .``); a deployment
names its own. The server never imports it: the run config does, as Flower's components are named
in ``pyproject.toml``.

``fedquant simulate`` runs this same app on Flower's simulation engine, built with
``make_server_app(setup)`` so that its progress display gets each round in-process.

Flower 1.42 builds a Message's metadata from ``flwr.supercore.task_identity.TaskIdentity``, which
Flower sets when it runs a ServerApp; a caller of ``run_server`` outside a ServerApp (a test) must
set it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.serverapp import ServerApp

from quant.qparams import QParams
from server.config import ServerConfig
from server.strategy import EvaluateFn, FedQuant


@dataclass
class ServerRun:
    """What one run of the ServerApp starts from and calls back (see the module docstring)."""

    config: ServerConfig
    initial: dict[str, QParams]
    out: Path
    weights: Mapping[str, Any] | None = None          # Linear path -> float weight, for smoothing
    evaluate_fn: EvaluateFn | None = None             # server-side evaluation on eval rounds
    on_round: Callable[[dict], None] | None = None    # after each round's checkpoint
    on_start: Callable[[], None] | None = None        # before the first round (references, say)
    on_finish: Callable[[dict[str, QParams]], None] | None = None   # the final QParams
    device_dir: Path | None = None                    # where the run's devices find their bundle


Setup = Callable[[dict], ServerRun]


def load_setup(spec: str) -> Setup:
    """The setup function named ``"module:function"`` (the run config's ``setup``)."""
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"run config 'setup' must be 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"run config 'setup' = {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"run config 'setup' = {spec!r} is not a function")
    return fn


def setup_from_run_config(run_config: Mapping[str, Any]) -> Setup:
    spec = run_config.get("setup")
    if not spec:
        raise ValueError("the run config has no 'setup' (e.g. setup = \"simulation.flower:setup\" in "
                         "pyproject.toml's [tool.flwr.app.config]): the server does not know what to start from")
    return load_setup(str(spec))


def serve(grid, run: ServerRun) -> dict[str, QParams]:
    """Run (or resume) ``run`` on ``grid`` with the FedQuant strategy; the final QParams."""
    if run.on_start is not None:
        run.on_start()
    strategy = FedQuant(run.config, run.initial, run.out, weights=run.weights, evaluate_fn=run.evaluate_fn,
                        on_round=run.on_round)
    strategy.start(grid)
    final = strategy.final()
    if run.on_finish is not None:
        run.on_finish(final)
    return final


def make_server_app(setup: Setup | None = None) -> ServerApp:
    """The ServerApp; ``setup`` overrides the run config's (``fedquant simulate`` passes its own,
    in-process, for its progress display)."""
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        if setup is None:
            log_to_stderr()
        run_config = dict(context.run_config)
        serve(grid, (setup or setup_from_run_config(run_config))(run_config))

    return app


def log_to_stderr() -> None:
    """The server's own log lines at INFO (a line per round, "resuming after round N", the nodes
    left out of the roster) on stderr: what ``flwr log`` shows of a ServerApp under the deployment
    engine, where Flower configures only its own logger. Once per process; ``fedquant simulate``
    shows rounds its own way and does not call this."""
    logger = logging.getLogger("server")
    if not any(getattr(h, "_fedquant", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._fedquant = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


server_app = make_server_app()


def run_server(grid, config: ServerConfig, initial: Mapping[str, QParams], out_dir, *,
               evaluate_fn: EvaluateFn | None = None, on_round: Callable[[dict], None] | None = None,
               weights: Mapping[str, Any] | None = None) -> dict[str, QParams]:
    """``serve`` without a ServerApp around it (tests, benches): the final QParams per profile."""
    return serve(grid, ServerRun(config, dict(initial), Path(out_dir), weights, evaluate_fn, on_round))

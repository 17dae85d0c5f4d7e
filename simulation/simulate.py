"""`fedquant simulate`: a fleet on one machine, on Flower's simulation engine (design.md s. 8, 10).

What it does, in order:

1. **prepare** (``simulation.prepare``): the model, the fleet, the float ONNX graph, each profile's
   starting QParams (random-token calibration) and the device directory every client loads.
2. **run**: the ServerApp of ``server.app`` (the ``server.strategy.FedQuant`` strategy: schedule,
   validation, aggregation, checkpoint and resume) and the ClientApp of ``client.app``, with the
   fleet's unreliable devices as a ClientApp mod (``simulation.faults``), on Flower's Ray backend;
   the server evaluates each profile's QParams on held-out roles with the ONNX Runtime integer model
   after every evaluation round (``simulation.evaluation``).
3. **report** (``simulation.report``): the references (float, random-token calibration, centralized
   calibration on the pooled training data with the same grids and calibrator), ``summary.json``,
   the final QParams, QDQ ONNX model and AIMET/QNN encodings per profile, and plots.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from quant.qparams import QParams
from simulation.config import SimulationConfig
from simulation.evaluation import ServerEval, references
from simulation.prepare import Prepared, prepare, say, server_weights
from simulation.report import record_scales, report


def backend_config(cfg: SimulationConfig) -> dict:
    return {"client_resources": {"num_cpus": cfg.engine.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": cfg.engine.num_cpus, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "ERROR", "log_to_driver": False}}


def run_federation(prep: Prepared, evaluate_fn, on_round=None) -> dict[str, QParams]:
    """The federation itself on Flower's simulation engine: the ServerApp of ``server.app`` and
    the ClientApp of ``client.app``, one SuperNode per client."""
    from flwr.simulation import run_simulation

    from client.app import make_app
    from server.app import ServerRun, make_server_app
    from simulation.faults import unreliable_for

    result: dict = {}

    def round_done(metrics: dict) -> None:
        record_scales(prep.out, metrics["round"])
        if on_round is not None:
            on_round(metrics)

    def setup(run_config: dict) -> ServerRun:
        return ServerRun(prep.cfg.server, prep.initial, prep.out,
                         weights=server_weights(prep) if prep.cfg.server.needs_weights else None,
                         evaluate_fn=evaluate_fn, on_round=round_done,
                         on_finish=lambda final: result.update(qparams=final), device_dir=prep.device_dir)

    faults = unreliable_for(prep)
    # The actors share this machine: their torch jobs (plan, torch lsq) take turns
    # (client.app.torch_turn), so that one such job's memory is in use at a time. Each keeps its
    # actor's one torch thread: with two per turn (commit c2e35f9) the learned ranges' float sums
    # changed order and configs/memory.toml's final int8 perplexity moved by 0.6%
    # (bench/results/large_models_memory_two_threads.json): a run's figures would depend on Ray's
    # CPUs. One thread gives the same bits as before, in more time.
    client_app = make_app({"device-dir": str(prep.device_dir.resolve()),
                           "torch-lock": str((prep.out / "torch-jobs.lock").resolve())},
                          mods=[faults] if faults else [])
    quiet_flower()
    run_simulation(make_server_app(setup), client_app, num_supernodes=len(prep.clients),
                   backend_config=backend_config(prep.cfg))
    if "qparams" not in result:
        raise RuntimeError("the federation ended without a result (see the log above)")
    return result["qparams"]


def quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def simulate(cfg: SimulationConfig, out: Path, progress: Callable[[str], None] | None = None,
             on_round: Callable[[dict], None] | None = None) -> dict:
    """Prepare, run and report (module docstring); returns the summary also written to
    ``out/summary.json``."""
    t0 = time.perf_counter()
    prep = prepare(cfg, out, progress)
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size, ood=prep.ood)
    refs = references(prep, ev, progress)
    say(progress, f"federating: {len(prep.clients)} clients, {len(cfg.server.schedule)} schedule entries")
    final = run_federation(prep, ev, on_round)
    return report(prep, ev, refs, final, progress, time.perf_counter() - t0)

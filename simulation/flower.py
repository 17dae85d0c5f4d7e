"""The run setup that ``pyproject.toml`` names for the ServerApp (``setup =
"simulation.flower:setup"`` in ``[tool.flwr.app.config]``, read by ``server.app``).

``flwr run .`` and ``fedquant fleet`` run ``server.app:server_app`` and ``client.app:app``; the
ServerApp asks this setup what to start from. It prepares the run named by the run config's
``config`` (a SimulationConfig TOML, relative to the project) exactly as ``fedquant simulate``
does, evaluates on the server with held-out roles, and writes the same report at the end. The
clients find the device directory from the run config's ``device-dir``, which must name the same
run directory (``runs/<name>/device``; relative paths resolve against the project).

Under the deployment engine (``fedquant fleet``, docs/fleet.md) Flower installs the FAB under the
SuperLink's and each SuperNode's FLWR_HOME, so "the project" is that installed copy and
``fedquant fleet run`` passes ``config``, ``out`` and ``device-dir`` as absolute paths. ``prepare``
then finds the run directory ``fedquant fleet`` prepared before the SuperNodes started (same
config: nothing is recomputed).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup(run_config: dict):
    """The ``server.app.ServerRun`` of a simulation config's run directory (prepared if needed)."""
    from server.app import ServerRun
    from simulation.evaluation import ServerEval, references
    from simulation.prepare import load_simulation_config, prepare, server_weights
    from simulation.report import record_scales, report

    cfg_path = Path(str(run_config.get("config", "configs/default.toml")))
    cfg = load_simulation_config(cfg_path if cfg_path.is_absolute() else ROOT / cfg_path)
    out = Path(str(run_config.get("out") or f"runs/{cfg.name}"))
    out = out if out.is_absolute() else ROOT / out
    prep = prepare(cfg, out, progress=print)
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size, ood=prep.ood)
    refs: dict = {}

    def finish(final) -> None:
        summary = report(prep, ev, refs, final, print)
        print(f"wrote {out}/summary.json: " + ", ".join(
            f"{p}: federated PPL {s['federated_ppl'][-1]:.2f}" for p, s in summary["profiles"].items()
            if s["federated_ppl"]))

    return ServerRun(cfg.server, prep.initial, out,
                     weights=server_weights(prep) if cfg.server.needs_weights else None, evaluate_fn=ev,
                     on_round=lambda m: record_scales(out, m["round"]),
                     on_start=lambda: refs.update(references(prep, ev, print)), on_finish=finish,
                     device_dir=prep.device_dir)

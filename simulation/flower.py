"""The Flower app for ``flwr run`` (pyproject ``[tool.flwr.app.components]``).

``serverapp = "simulation.flower:server_app"`` prepares the run named by the run config's ``config``
(a SimulationConfig TOML, relative to the project) exactly as ``fedquant simulate`` does, then runs
``server.app.run_server`` with server-side evaluation, and writes the same report. The clients are
``client.app:app``; they find the device directory from the run config's ``device-dir``, which
must name the same run directory (``runs/<name>/device``; relative paths resolve against the
project). ``fedquant simulate`` is the same thing with its own progress display.

Under the deployment engine (``fedquant fleet``, docs/fleet.md) the same app runs unchanged:
Flower installs the FAB under the SuperLink's and each SuperNode's FLWR_HOME, so "the project" is
that installed copy and ``fedquant fleet run`` passes ``config``, ``out`` and ``device-dir`` as
absolute paths. ``prepare`` then finds the run directory ``fedquant fleet`` prepared before the
SuperNodes started (same config: nothing is recomputed) and the device directory the ClientApps
already load.
"""

from __future__ import annotations

from pathlib import Path

from flwr.serverapp import ServerApp

ROOT = Path(__file__).resolve().parent.parent

server_app = ServerApp()


@server_app.main()
def main(grid, context) -> None:
    from server.app import run_server
    from simulation.simulate import (ServerEval, _references, load_simulation_config, prepare,
                                     record_scales, report, server_weights)

    rc = context.run_config
    cfg_path = Path(str(rc.get("config", "configs/default.toml")))
    cfg = load_simulation_config(cfg_path if cfg_path.is_absolute() else ROOT / cfg_path)
    out = Path(str(rc.get("out") or f"runs/{cfg.name}"))
    out = out if out.is_absolute() else ROOT / out
    prep = prepare(cfg, out, progress=print)
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size)
    refs = _references(prep, ev, print)
    final = run_server(grid, cfg.server, prep.initial, out, evaluate_fn=ev,
                       on_round=lambda m: record_scales(out, m["round"]),
                       weights=server_weights(prep) if cfg.server.smoothing else None)
    summary = report(prep, ev, refs, final, print)
    print(f"wrote {out}/summary.json: " + ", ".join(
        f"{p}: federated PPL {s['federated_ppl'][-1]:.2f}" for p, s in summary["profiles"].items()
        if s["federated_ppl"]))

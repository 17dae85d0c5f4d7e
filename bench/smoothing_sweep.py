"""The sweep behind configs/default.toml's smoothing strengths and range rules (issue 5).

    .venv/bin/python -m bench.smoothing_sweep [--alphas 0 0.5 0.8]    # about 25 min on 2 cores

On SmolLM2 and the clients of configs/default.toml: every client's scouting reply (with per-channel
abs-max), then, per SmoothQuant strength alpha (0 = no smoothing), the smoothing factors, the
statistics of every client on the smoothed model and each range rule (MSE, percentile 99.999,
min-max) for both profiles -- the federation's own functions (server.rounds, client.jobs) run
centrally, which equals a federation in which every client takes part (tests/test_simulate.py). In
this sweep every profile gets the same alpha and the statistics pool every client.

Each recipe is evaluated twice in the ONNX Runtime integer model: on the server's held-out roles
("heldout") and on the clients' own held-out text ("clients_test"). The choices in
configs/default.toml were read from both: the range rules from "clients_test" only; the mixed
profile's alpha (0.5, since 0.8 multiplies its perplexity) from both; the int8 alpha 0.8 also
comes from issue 5's own measurement. Writes bench/results/smoothing_sweep.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, write_json


def main(argv=None) -> dict:
    from client.jobs import scout, statistics
    from client.runtime import DeviceRuntime
    from quant.calibrate import CalibratorConfig
    from quant.qparams import QParams
    from quant.wire import Instruction
    from server.aggregate import grids_from_scouting, ranges_for_profile, sum_statistics
    from server.config import SmoothingConfig
    from server.rounds import (activation_keys, scout_instruction, smoothable_paths, smoothed_qparams,
                               smoothed_scouting, smoothing_from_scouting)
    from simulation.evaluation import ServerEval, float_perplexity
    from simulation.prepare import load_simulation_config, prepare, server_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.8])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "smoothing-sweep", help="its prepared run directory")
    ap.add_argument("--json", type=Path, default=RESULTS / "smoothing_sweep.json")
    args = ap.parse_args(argv)

    cfg = load_simulation_config(ROOT / "configs" / "default.toml")
    server = cfg.server.model_copy(update={"smoothing": SmoothingConfig(alpha=0.8)})  # unit Divs for every profile
    cfg = cfg.model_copy(update={"server": server})
    prep = prepare(cfg, args.out, progress=print)
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, 8)
    name = "int8"
    rt = DeviceRuntime(prep.device_dir / name / "model.onnx", threads=cfg.threads)
    weights = server_weights(prep)
    paths = smoothable_paths(prep.initial, server, weights)
    held = prep.initial[name]
    ins = scout_instruction(0, held, {f"{p}:input": int(weights[p].shape[1]) for p in paths})
    scouting = [scout(rt, ins, c.train, batch_size=4)[0] for c in prep.clients]
    res: dict = {"float": float_perplexity(prep.float_onnx, prep.evals, cfg.threads), "alphas": args.alphas}
    tests = np.concatenate([c.test for c in prep.clients if len(c.test)])
    t0 = time.perf_counter()
    for alpha in args.alphas:
        if alpha > 0:
            factors = smoothing_from_scouting(scouting, paths, weights, alpha, server)
            sm = [smoothed_scouting(r, factors) for r in scouting]
            init = {p: smoothed_qparams(qp, factors, weights, sm) for p, qp in prep.initial.items()}
        else:
            sm, init = scouting, dict(prep.initial)
        q0 = init[name]
        rt.patch(QParams(q0.points, q0.model, max(q0.version, rt.qparams.version), q0.smoothing))
        grids = grids_from_scouting(sm, server.bins, server.grid_margin, server.grid_quantile)
        sins = Instruction(round=0, job="stats", qparams=q0, keys=tuple(sorted(grids)), grids=grids)
        merged = sum_statistics([statistics(rt, sins, c.train, batch_size=4)[0].stats for c in prep.clients])
        for method, kw in (("mse", {}), ("percentile", {"percentile": 99.999}), ("minmax", {})):
            cal = CalibratorConfig(method=method, **kw)
            for p, qp in init.items():
                specs = {k: qp.points[k].spec for k in activation_keys(qp) if k in merged and merged[k].n > 0}
                q = QParams({**qp.points, **ranges_for_profile(merged, specs, cal)}, qp.model, qp.version + 1,
                            qp.smoothing)
                e = ev(p, q)["perplexity"]
                nll, tok = ev.runtime(p).evaluate(tests, 8)
                res[f"{p}/a{alpha}/{method}"] = {"heldout": e, "clients_test": float(np.exp(nll / tok)),
                                                 "inc": 100 * (e / res["float"] - 1)}
                print(p, alpha, method, res[f"{p}/a{alpha}/{method}"], flush=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()

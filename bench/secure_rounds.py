"""What secure aggregation (SecAgg+, docs/privacy.md) costs a scouting and a statistics round,
beside the same rounds in the clear.

With the tiny model (``bench.flower_rounds.sim_config``: one 32-token sequence per client, one int8
profile, 512 bins, SmoothQuant at alpha 0.8 so the scouting round asks for per-channel abs-max), for
N = 10, 100 and 1000 simulated clients, two runs of ``server.app.run_server`` on the same fleet
(a Flower simulation each, Ray backend), each scout + stats (every client sampled),
statistics summed: first in the clear, then with ``[server] secure`` (the scouting round private:
two SecAgg+ passes, ``quant.private_scout``). The secure run's neighbourhood is
``num_shares = min(1, 33 / N)`` (SecAgg+ shares each client's secrets with O(log N) neighbours, not
all of them), reconstruction threshold half of it.

Per N and round (scout, stats): the wall time (``metrics.jsonl``; rounds per minute = 60 / wall)
and the payload bytes per client (plain: instruction down, reply up; secure: every step of every
protocol both ways, ``secure.bytes`` of the metrics line: keys, encrypted shares, the instruction,
the masked vector, and for scouting both passes; the scouting round's wall time includes the
actors' first loading of the model, in both runs), the seconds of each protocol step's exchange with
the clients and of the server's work between them, and whether the secure run counted what the
plaintext one did: the same number of values per point in the statistics sums (their grids differ:
the private scouting's are wider by up to a histogram cell, ``grids_cover``).

    .venv/bin/python -m bench.secure_rounds                 # N = 10, 100, 1000 -> bench/results/secure_rounds.json
    .venv/bin/python -m bench.secure_rounds --clients 10    # one N
    .venv/bin/python -m bench.secure_rounds --sizes RUN_DIR # a prepared run's scouting sizes per client
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, quiet_env, versions, write_json

quiet_env()

DEFAULT_OUT = RESULTS / "secure_rounds.json"


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def configs(n: int):
    """The plain and the secure server configs for ``n`` clients (scout + stats, sums)."""
    from bench.flower_rounds import sim_config
    from server.config import SecureConfig, SmoothingConfig

    sim = sim_config(n, lsq=False)
    plain = sim.server.model_copy(update={"stats_rule": "sum", "absmax_rule": "max",
                                          "smoothing": SmoothingConfig(alpha=0.8)})
    sim = sim.model_copy(update={"server": plain})
    secure = plain.model_copy(update={"secure": SecureConfig(num_shares=min(1.0, 33 / n), reconstruction_threshold=0.5)})
    return sim, plain, secure


def same_counts(a: Path, b: Path) -> bool:
    """The statistics sums of two runs count the same number of values per point."""
    from server.state import load_checkpoint

    sa, sb = load_checkpoint(a).sums, load_checkpoint(b).sums
    return set(sa) == set(sb) and all(sa[k].n == sb[k].n for k in sa)


def grids_cover(plain: Path, secure: Path) -> bool:
    """Each point's grid from the private scouting round holds the plaintext one and is at most a
    histogram cell (2^(1/8)) and the grid's snapping wider (the points' own grids, before smoothing;
    the statistics round may have widened both)."""
    from server.state import load_checkpoint

    gp, gs = load_checkpoint(plain).grids, load_checkpoint(secure).grids
    raw = [k for k in gp if "@" not in k]
    return bool(raw) and all(gp[k].hi <= gs[k].hi <= gp[k].hi * 2 ** (1 / 8) * (1 + 2.0 ** -7)
                             and (gp[k].lo == 0) == (gs[k].lo == 0) for k in raw)


def run_n(n: int, work: Path) -> dict:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import make_app
    from server.app import run_server
    from server.roster import wait_for_nodes
    from simulation.prepare import prepare, server_weights
    from simulation.simulate import backend_config, quiet_flower

    sim, plain, secure = configs(n)
    t0 = time.perf_counter()
    prep = prepare(sim, work / f"n{n}", progress=log)
    if len(prep.clients) != n:
        raise RuntimeError(f"asked for {n} clients, the fleet has {len(prep.clients)}")
    prepare_s = time.perf_counter() - t0
    sim_s = {}
    # one simulation per run: with smoothing the plaintext run's phones end on a newer QParams
    # version, and would refuse the second run's first instruction as stale
    for name, cfg in (("plain", plain), ("secure", secure)):
        out: dict = {"error": None}
        server_app = ServerApp()

        @server_app.main()
        def _main(grid, context, name=name, cfg=cfg) -> None:
            try:
                wait_for_nodes(grid, n, cfg.wait_s)
                run_server(grid, cfg, prep.initial, prep.out / name, weights=server_weights(prep),
                           on_round=lambda r: log(f"N={n} {name} round {r['round']} {r['job']}: "
                                                  f"{r['wall_s']:.2f} s, {r['replies']} replies"))
            except BaseException:  # noqa: BLE001 -- reported after the simulation ends
                out["error"] = traceback.format_exc()

        quiet_flower()
        t1 = time.perf_counter()
        run_simulation(server_app, make_app({"device-dir": str(prep.device_dir.resolve())}), num_supernodes=n,
                       backend_config=backend_config(prep.cfg))
        sim_s[name] = time.perf_counter() - t1
        if out["error"]:
            raise RuntimeError(f"N={n}: the ServerApp of the {name} run failed:\n{out['error']}")
    row = {"clients": n, "num_shares": secure.secure.num_shares, "prepare_s": prepare_s, "simulation_s": sim_s}
    for name in ("plain", "secure"):
        lines = [json.loads(x) for x in (prep.out / name / "metrics.jsonl").read_text().splitlines()]
        for job in ("scout", "stats"):
            st = next(m for m in lines if m["job"] == job)
            extra = {}
            if name == "secure":
                b = st["secure"]["bytes"]["int8"]
                down, up = b["down_per_client"], b["up_per_client"]
                # per protocol, the four exchanges with the clients (setup, key shares, masked
                # vectors, unmasking), and the server's own work between them (mostly rebuilding
                # mask seeds from shares); a scouting round runs two protocols
                protocols = [st["secure"]["int8"]] + ([st["secure"]["second_pass"]["int8"]] if job == "scout" else [])
                extra = {"step_s": [p["step_s"] for p in protocols],
                         "server_between_steps_s": sum(p["protocol_s"] - sum(p["step_s"]) for p in protocols)}
            else:
                down, up = st["bytes_down_per_client"], st["bytes_up_per_client"]
            row[f"{name}_{job}"] = {"wall_s": st["wall_s"], "rounds_per_min": 60 / st["wall_s"],
                                    "replies": st["replies"], "rejections": st["rejections"],
                                    "bytes_down_per_client": down, "bytes_up_per_client": up, **extra}
    for job in ("scout", "stats"):
        row[f"secure_vs_plain_time_{job}"] = row[f"secure_{job}"]["wall_s"] / row[f"plain_{job}"]["wall_s"]
    a, b = prep.out / "plain" / "checkpoint.safetensors", prep.out / "secure" / "checkpoint.safetensors"
    row["same_counts"], row["grids_cover"] = same_counts(a, b), grids_cover(a, b)
    return row


def scout_sizes(run_dir: Path, config_path: Path) -> dict:
    """What one client sends in a scouting round of a prepared run (``run_dir``, prepared for
    ``config_path``), per profile: the plaintext reply (``min_max`` float64 and ``n`` int64 per
    point, ``absmax`` float32 per channel) and the private passes' vectors, which SecAgg+ masks as
    8-byte levels (``quant.private_scout.first_pass_length`` / ``second_pass_length``). Arithmetic
    on the instruction, no run: the protocol's keys and shares add about 30-40 kB (the tiny-model
    rows)."""
    from client.runtime import load_float_linears, weights_path
    from quant import private_scout as ps
    from quant.qparams import load_qparams
    from server.config import SecureConfig
    from server.rounds import instructions_for
    from server.state import initial_state
    from simulation.prepare import load_simulation_config

    cfg = load_simulation_config(config_path)
    initial = {f.stem: load_qparams(f) for f in sorted((run_dir / "initial").glob("*.safetensors"))}
    name = next(iter(initial))
    weights = load_float_linears(weights_path(run_dir / "device" / name / "model.onnx")).weights()
    secure = cfg.server.model_copy(update={"stats_rule": "sum", "secure": SecureConfig()})
    scout = next(r for r, spec in secure.rounds() if spec.job == "scout")
    inss = instructions_for(initial_state(initial, ""), scout, dict(secure.rounds())[scout], secure, weights)
    out = {}
    for prof, ins in inss.items():
        channels = sum(ins.absmax.values())
        first, second = ps.first_pass_length(ins), ps.second_pass_length(ins)
        out[prof] = {"points": len(ins.keys), "absmax_points": len(ins.absmax), "channels": channels,
                     "plain_reply_bytes": 24 * len(ins.keys) + 4 * channels,
                     "pass1_numbers": first, "pass2_numbers": second,
                     "pass1_masked_bytes": 8 * first, "pass2_masked_bytes": 8 * second}
    return out


def table(res: dict) -> str:
    lines = ["| clients | round | neighbours | plain: s / round (rounds/min) | secure: s / round (rounds/min) "
             "| secure / plain time | plain bytes down + up per client | secure bytes down + up per client |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        nb = max(3, round(r["num_shares"] * r["clients"])) if r["num_shares"] < 1 else r["clients"]
        for job in ("scout", "stats"):
            p, s = r[f"plain_{job}"], r[f"secure_{job}"]
            lines.append(f"| {r['clients']} | {job} | {nb} | {p['wall_s']:.1f} ({p['rounds_per_min']:.2g}) | "
                         f"{s['wall_s']:.1f} ({s['rounds_per_min']:.2g}) | {r[f'secure_vs_plain_time_{job}']:.1f}x | "
                         f"{p['bytes_down_per_client'] / 1e3:.1f} + {p['bytes_up_per_client'] / 1e3:.1f} kB | "
                         f"{s['bytes_down_per_client'] / 1e3:.1f} + {s['bytes_up_per_client'] / 1e3:.1f} kB |")
    checks = [f"N={r['clients']}: same counts {'yes' if r['same_counts'] else 'NO'}, grids cover "
              f"{'yes' if r['grids_cover'] else 'NO'}" for r in res["rows"]]
    return "\n".join(lines) + "\n\n" + "; ".join(checks) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--work", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--sizes", type=Path, default=None, metavar="RUN_DIR",
                    help="only the scouting round's sizes per client of a prepared run (e.g. SmolLM2's) -> "
                         "bench/results/private_scout_sizes.json")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.toml", help="the config of --sizes' run")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out for other client counts (one long row can be rerun alone)")
    args = ap.parse_args(argv)
    if args.sizes is not None:
        res = {"bench": "secure_rounds --sizes", "config": args.config.name, "machine": machine(),
               "profiles": scout_sizes(args.sizes, args.config)}
        write_json(Path(args.out) if args.out else RESULTS / "private_scout_sizes.json", res)
        print(json.dumps(res["profiles"], indent=1))
        return res
    out = Path(args.out) if args.out else DEFAULT_OUT
    t0 = time.perf_counter()
    res = {"bench": "secure_rounds", "machine": machine(), "versions": versions(("flwr", "ray", "cryptography", "numpy")),
           "rows": []}
    kept = []
    if args.merge and out.is_file():    # rows of this format only: an older file's rows lack the scouting round
        before = json.loads(out.read_text())
        kept = [r for r in before.get("rows", []) if r.get("clients") not in args.clients and "secure_scout" in r]
        if kept:                        # the wall time of the invocation(s) that measured the kept rows
            res["kept_wall_s"] = before.get("kept_wall_s", 0) + before.get("wall_s", 0)
    with tempfile.TemporaryDirectory(prefix="secure-rounds-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        new = []
        for n in args.clients:
            t_row = time.perf_counter()
            new.append(run_n(n, work) | {"row_wall_s": round(time.perf_counter() - t_row, 1)})
            res["rows"] = sorted(kept + new, key=lambda r: r["clients"])
            res["wall_s"] = round(time.perf_counter() - t0, 1)   # this invocation's rows
            write_json(out, res)                   # each N as it ends: a long run keeps what it did
            log(table(res))
    print(table(res))
    return res


if __name__ == "__main__":
    main()

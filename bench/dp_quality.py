"""Differential privacy's price in quality (issue 15, goal 3): perplexity against epsilon on SmolLM2.

The statistics rounds as the federation runs them under ``[server] dp`` (``quant.dp``,
``server.rounds._dp_stats``): each client calibrates its own range per point (the profile's
calibrator on its own statistics: ``client.jobs.statistics``, ``quant.calibrate``), sends the
``log2`` of its width over the current release's and the shift of zero's place, clipped to L2
norm ``C``; the server adds Gaussian noise ``z 2 C`` to each profile's sum and moves the release by
the noisy mean.
Two rounds as in ``configs/default.toml`` (``stats`` x 2, half the fleet each; a statistics round
samples clients no earlier one used, so the halves are disjoint): round 1 starts from the
random-token calibration every device ships with (public), round 2 from round 1's release. Each
client's data is in one release only, so the two compose in parallel (the second is post-processing
of the first plus other clients' data): ``z`` is the smallest noise multiplier at which one
Gaussian release spends the row's epsilon at ``delta = 1e-5`` (``server.privacy``: Flower's RDP
accountant, replace-one; no amplification by sampling is claimed). Rows per fleet: the pooled
histograms in the clear (the exact recipe, no DP), the per-client ranges without noise (the
estimator's own cost), then each epsilon. The evaluation is the server's: perplexity and fidelity
to float on the 64 held-out sequences of ``configs/default.toml``, int8 and mixed profiles.

Fleets: the 24 clients of ``configs/default.toml`` (4 sequences each), and ``--clients N`` (1,000 by
default) clients of one 128-token sequence each, cut from the training text of the roles no
evaluation sequence comes from (``simulation.fleet.build_fleet`` with more sequences per role:
the same held-out roles). Statistics are computed piece by piece with the device's job function,
not by running N Flower clients.

Not covered by epsilon: the scouting round (grids and SmoothQuant factors from the 24 clients'
per-channel abs-max, in the clear; docs/privacy.md). One noise draw per row (``--seed``).

    .venv/bin/python -m bench.dp_quality --run runs/default [--clients 1000] [--epsilons 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, machine, write_json
from quant.qparams import atomic_write_bytes

ROUND_FRACTION = 0.5          # configs/default.toml: two stats rounds, fraction 0.5
ROUNDS = 2
DELTA = 1e-5                  # far below 1 / clients for every fleet here


@dataclass
class Piece:
    """A client of the large fleet: one training sequence."""

    train: np.ndarray
    profile: str


def large_fleet(prep, n: int, seed: int) -> list[Piece]:
    """``n`` one-sequence clients from the training text of the non-held-out roles (the same
    held-out roles as ``prep``: ``build_fleet`` with the same seed and held-out fraction), profiles
    in the config's shares."""
    from simulation.fleet import build_fleet
    from simulation.models import load_model

    _, tokenizer = load_model(prep.cfg.model)
    shares = [(e.load().name, e.share) for e in prep.cfg.fleet]
    data = prep.cfg.data.model_copy(update={"train_sequences": 64, "test_sequences": 0})
    clients = []
    for roles in (400, 200, 100, prep.cfg.data.clients):      # the first that the corpus has
        try:
            clients, _, _ = build_fleet(data.model_copy(update={"clients": roles}), tokenizer, shares)
            break
        except ValueError:
            continue
    seqs = np.concatenate([c.train for c in clients])
    if len(seqs) < n:
        raise SystemExit(f"only {len(seqs)} training sequences in {len(clients)} roles, {n} clients asked for")
    pick = np.random.default_rng(seed).permutation(len(seqs))[:n]
    weights = np.array([s for _, s in shares], dtype=np.float64)
    names = [name for name, _ in shares]
    counts = np.zeros(len(names))
    out = []
    for i, j in enumerate(pick):   # the profile furthest below its share, as build_fleet does
        k = int(np.argmax(weights / weights.sum() * (i + 1) - counts))
        counts[k] += 1
        out.append(Piece(seqs[j:j + 1], names[k]))
    print(f"large fleet: {n} one-sequence clients from {len(seqs)} sequences of {len(clients)} roles", flush=True)
    return out


def per_client_ranges(prep, clients, own_group_only: bool = False, profiles=None) -> tuple[dict, dict]:
    """Per profile: the starting QParams (smoothed), the specs calibrated, and the own range per
    point of each client of that profile ({client index: {key: (lo, hi)}}: a device calibrates for
    its own profile), plus each profile's pooled-histogram QParams (the exact recipe, every
    client's histograms as in the federation in the clear)."""
    from quant.calibrate import calibrate
    from quant.qparams import QParams
    from server.aggregate import ranges_for_profile, sum_statistics
    from server.rounds import activation_keys
    from simulation.evaluation import client_statistics

    scfg = prep.cfg.server
    out, pooled = {}, {}
    for members, initial, per_client in client_statistics(prep, clients=clients, own_group_only=own_group_only,
                                                          profiles=profiles):
        merged = sum_statistics([st for st in per_client if st])
        for p in members:
            if profiles is not None and p not in profiles:
                continue
            qp, cal = initial[p], scfg.calibrator_for(p)
            specs = {k: qp.points[k].spec for k in activation_keys(qp) if k in merged and merged[k].n > 0}
            pooled[p] = QParams({**qp.points, **ranges_for_profile(merged, specs, cal)}, qp.model, qp.version,
                                qp.smoothing, {**qp.meta, "recipe": "pooled histograms"})
            own = {i: {k: calibrate(st[k], specs[k], cal) for k in specs if k in st and st[k].n > 0}
                   for i, (st, c) in enumerate(zip(per_client, clients)) if c.profile == p}
            out[p] = (qp, specs, own)
    return out, pooled


def dp_release(ranges: dict, n: int, z: float, clips: tuple[float, ...], seed: int) -> tuple:
    """The rounds' releases (module docstring), as the federation makes them: round ``r`` samples
    its share of the ``n`` clients (disjoint from earlier rounds'), each sampled client sends one
    clipped vector for its own profile's points, and each profile's release is the noisy mean of
    its clients' vectors. Returns QParams per profile after the last round, and per round the
    clients' vector norms before clipping."""
    from quant import dp
    from quant.affine import qparams_to_range, range_to_qparams
    from quant.qparams import PointParams, QParams

    rng = np.random.default_rng(seed)
    m = max(1, math.ceil(ROUND_FRACTION * n))
    order = rng.permutation(n)
    centres = {p: {k: tuple(float(v) for v in qparams_to_range(qp.points[k].scale, qp.points[k].zero_point, spec))
                   for k, spec in specs.items()} for p, (qp, specs, _) in ranges.items()}
    norms = []
    for r, clip in enumerate(clips):
        sample = set(order[r * m:(r + 1) * m].tolist())      # disjoint: each client in one round
        norms.append([])
        for p, (_, _, own) in sorted(ranges.items()):
            mine = [own[i] for i in sorted(own) if i in sample]
            if not mine:
                continue
            raw = [dp.client_vector(o, centres[p], 1e30) for o in mine]
            norms[-1] += [float(np.linalg.norm(v)) for v in raw]
            total = dp.noisy_sum([dp.clip_l2(v, clip) for v in raw], dp.noise_std(z, clip) if z > 0 else 0.0, rng)
            counts = np.array([sum(k in o for o in mine) for k in sorted(centres[p])])
            centres[p] = dp.release(total, counts, centres[p])
    out = {}
    for p, (initial, specs, _) in ranges.items():
        points = {}
        for k, (lo, hi) in centres[p].items():
            sc, zp = range_to_qparams(lo, hi, specs[k])
            points[k] = PointParams(specs[k], sc, zp)
        out[p] = QParams({**initial.points, **points}, initial.model, initial.version, initial.smoothing,
                         {**initial.meta, "recipe": "dp ranges"})
    return out, norms


def save_cache(cache: Path, ranges: dict, pooled: dict) -> None:
    """Per profile the starting and pooled QParams (safetensors, quant.qparams) and, in
    ``ranges.json`` (written last: its presence marks a complete cache), the points calibrated and
    each client's own range per point. No pickle."""
    from quant.qparams import save_qparams

    cache.mkdir(parents=True, exist_ok=True)
    for p, (initial, _, _) in ranges.items():
        save_qparams(initial, cache / f"initial-{p}.safetensors")
        save_qparams(pooled[p], cache / f"pooled-{p}.safetensors")
    doc = {p: {"keys": sorted(specs), "own": {str(i): {k: list(r) for k, r in o.items()} for i, o in own.items()}}
           for p, (_, specs, own) in ranges.items()}
    atomic_write_bytes(cache / "ranges.json", json.dumps(doc).encode())


def load_cache(cache: Path) -> tuple[dict, dict]:
    from quant.qparams import load_qparams

    ranges, pooled = {}, {}
    for p, d in json.loads((cache / "ranges.json").read_text()).items():
        initial = load_qparams(cache / f"initial-{p}.safetensors")
        specs = {k: initial.points[k].spec for k in d["keys"]}
        own = {int(i): {k: (float(r[0]), float(r[1])) for k, r in o.items()} for i, o in d["own"].items()}
        ranges[p] = (initial, specs, own)
        pooled[p] = load_qparams(cache / f"pooled-{p}.safetensors")
    return ranges, pooled


def fleet_rows(prep, ev, name: str, clients, epsilons, clips, seed: int, profiles=None) -> dict:
    from server.privacy import noise_multiplier_for

    t0 = time.perf_counter()
    tag = "" if profiles is None else "-" + "-".join(sorted(profiles))
    cache = prep.out / "dp-cache" / f"{name.replace(' ', '-')}-{len(clients)}-seed{seed}{tag}"
    if (cache / "ranges.json").is_file():      # the per-client statistics are the slow part
        ranges, pooled = load_cache(cache)
    else:
        ranges, pooled = per_client_ranges(prep, clients, own_group_only=len(clients) > len(prep.clients),
                                           profiles=profiles)
        save_cache(cache, ranges, pooled)
    n = len(clients)
    delta, releases = DELTA, [n]        # parallel composition: one full release per client
    res = {"clients": n, "delta": delta, "per_round": max(1, math.ceil(ROUND_FRACTION * n)),
           "profiles": sorted(ranges),
           "pooled": ("each profile's own clients' histograms (half the statistics work)"
                      if n > len(prep.clients) else "every client's histograms, as the federation in the clear"),
           "clips_octaves": list(clips),
           "statistics_s": round(time.perf_counter() - t0, 1), "rows": []}
    print(f"{name}: per-client statistics and ranges in {res['statistics_s']:.0f} s", flush=True)

    def row(label, eps, z, qps, norms=None):
        r = {"row": label, "epsilon": eps, "noise_multiplier": z}
        for p, qp in sorted(qps.items()):
            e = ev(p, qp)
            r[p] = {k: e[k] for k in ("perplexity", "float_perplexity", "vs_float_pct", "vs_float_pct_ci",
                                      "kl", "kl_ci", "top1", "top1_ci")}
        if norms is not None:
            r["norms_median"] = [float(np.median(x)) for x in norms]
            r["norms_p90"] = [float(np.percentile(x, 90)) for x in norms]
        res["rows"].append(r)
        print(f"{name} {label}: " + ", ".join(f"{p} {r[p]['perplexity']:.2f}" for p in sorted(qps)), flush=True)

    row("pooled histograms (no DP)", None, None, pooled)
    for label, eps in [("per-client ranges, no noise", None)] + [(f"epsilon {e:g}", e) for e in epsilons]:
        z = 0.0 if eps is None else noise_multiplier_for(eps, releases, n, delta)
        qps, norms = dp_release(ranges, n, z, clips, seed)
        row(label, eps, z, qps, norms)
    return res


def table(res: dict) -> str:
    """Markdown: per fleet and row, int8 and mixed perplexity with the change vs float [95%] and
    KL, and the noise multiplier."""
    def cell(e):
        if e is None:
            return "- | - | -"
        lo, hi = e["vs_float_pct_ci"]
        ppl = f"{e['perplexity']:.2f}" if e["perplexity"] < 1e4 else f"{e['perplexity']:.2g}"
        inc = (f"{e['vs_float_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}]" if abs(e["vs_float_pct"]) < 1e3
               else f"x{e['perplexity'] / e['float_perplexity']:.2g}")
        return f"{ppl} | {inc} | {e['kl']:.3f}"
    lines = ["| fleet | statistics rounds | z | int8 PPL | vs float [95%] | KL | mixed PPL | vs float [95%] | KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, f in res["fleets"].items():
        for r in f["rows"]:
            z = "" if not r.get("noise_multiplier") else f"{r['noise_multiplier']:.2f}"
            lines.append(f"| {name} ({f['clients']}, {f['per_round']} per round) | {r['row']} | {z} | "
                         f"{cell(r.get('int8'))} | {cell(r.get('mixed'))} |")
    first = next(iter(res["fleets"].values()))["rows"][0]
    return "\n".join(lines) + (f"\n\nFloat: {first['int8']['float_perplexity']:.2f} on the {res['eval_sequences']} "
                               f"held-out sequences.\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default",
                    help="a run directory of configs/default.toml (prepared there if new)")
    ap.add_argument("--clients", type=int, default=1000, help="the large fleet's size (0: skip it)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--clips", type=float, nargs=ROUNDS, default=[6.0, 1.5],
                    help="L2 clip per round of the client vectors (log2 width ratio, shift of zero's place "
                         "per point)")
    ap.add_argument("--large-profiles", nargs="+", default=["int8"],
                    help="profiles measured on the large fleet (the mixed profile's MSE calibrator, estimated "
                         "at ~70 ms a point on a shared core, is ~15 s per client: ~80 min for its 333)")
    ap.add_argument("--skip-default", action="store_true", help="only the large fleet (the default's rows kept "
                                                                 "from --out when it holds them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "dp_quality.json")
    args = ap.parse_args(argv)

    from simulation.evaluation import ServerEval
    from simulation.prepare import load_simulation_config, prepare

    cfg = load_simulation_config(ROOT / "configs" / "default.toml")
    prep = prepare(cfg, args.run, progress=lambda m: print(m, flush=True))
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size, seed=cfg.server.seed)
    t0 = time.perf_counter()
    res = {"model": cfg.model, "machine": machine(), "eval_sequences": int(len(prep.evals)),
           "rounds": ROUNDS, "round_fraction": ROUND_FRACTION, "fleets": {}}
    fleets = [] if args.skip_default else [("default", prep.clients, None)]
    if args.skip_default and args.out.is_file():
        before = json.loads(args.out.read_text())
        res["fleets"]["default"] = before["fleets"]["default"]
        res["default_from_earlier_run"] = {"wall_s": before.get("wall_s"), "machine": before.get("machine")}
    if args.clients:
        fleets.append((f"{args.clients} clients", large_fleet(prep, args.clients, args.seed), args.large_profiles))
    for name, clients, profiles in fleets:
        res["fleets"][name] = fleet_rows(prep, ev, name, clients, args.epsilons, tuple(args.clips), args.seed,
                                         profiles)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()

"""Summable stand-ins for the scouting round's per-channel abs-max (the max over clients), which
secure aggregation cannot compute (docs/privacy.md, "Not private yet").

Reads the honest scouting replies ``python -m bench.poisoning`` keeps in its cache (SmolLM2, the 24
clients of ``configs/default.toml``: one per client), and compares with the exact max over clients,
per channel of every smoothable input:

- the log-moment estimate ``exp(mean + z std)`` of the clients' log abs-max (two sums per channel);
- the power mean ``(sum a^p)^(1/p)`` (one sum per channel; never below the max, at most
  ``K^(1/p)`` above it), which in fixed point needs each ``a`` scaled by a bound ``B`` close to the
  max: the levels SecAgg+ gives (2^29 over [0, 1]) hold ``(a/B)^p`` only for ``a/B`` above
  ``2^(-29/p)``.

    .venv/bin/python -m bench.private_absmax [--cache runs/bench-poisoning/cache]

``--quality RUN_DIR`` (a run directory of ``configs/default.toml``, SmolLM2: prepared there when it
is new, reused when it holds that config's preparation) also measures what each stand-in costs in perplexity: the centralized
recipe (``simulation.evaluation.centralized_qparams``: scouting, SmoothQuant, statistics of the
pooled training data, calibration) with every client's per-channel abs-max replaced by the
fleet-wide estimate, which is all a server that cannot see clients one by one would have (the
smoothed inputs' grids then come from it too), evaluated on the server's held-out sequences. The
power mean is simulated as the planned two secure passes would give it: ``B = 2 exp(mean + 2 std)``
of log abs-max, then ``(min(a, B) / B)^16`` rounded to SecAgg+'s 2^-29 levels and summed (the
log-moment estimate where every client rounds to 0). The built round (``quant.private_scout``: the
bound's Samuelson term, the fixed point's tolerance in the estimate, the geometric-mean floor) is
measured too, in Flower's own fixed point (``built_estimate``), for the error rows only.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, machine, write_json
from quant.wire import unpack


def scouting_absmax(cache: Path) -> list[dict[str, np.ndarray]]:
    """Each cached scouting reply's per-channel abs-max (input key -> (C,) float64)."""
    out = []
    for f in sorted(glob.glob(str(cache / "replies" / "*.npz"))):
        z = np.load(f)
        header = json.loads(str(z["header"]))
        if header.get("kind") != "scout":
            continue
        arrays = unpack({k[2:]: z[k] for k in z.keys() if k.startswith("a/")}, header["index"])
        out.append({k[len("absmax/"):]: v.astype(np.float64) for k, v in arrays.items() if k.startswith("absmax/")})
    return out


def log2_errors(est: dict, true: dict) -> dict:
    r = np.concatenate([np.log2(est[k] / true[k]) for k in sorted(true)])
    return {"median": float(np.median(r)), "p5": float(np.percentile(r, 5)), "p95": float(np.percentile(r, 95)),
            "min": float(r.min()), "max": float(r.max()), "off_by_more_than_25pct": float(np.mean(np.abs(2 ** r - 1) > 0.25))}


LEVEL = 2.0 ** -29          # one SecAgg+ level over [0, 1] with quantization_range 2^30 over [-1, 1]


def power_mean_secure(a: np.ndarray, p: int = 16) -> np.ndarray:
    """The max over clients (rows of ``a``, per column) as the two planned secure passes estimate
    it: a bound from log-moments, then the power mean of the clipped, scaled values in fixed point."""
    logs = np.log(np.maximum(a, 1e-30))
    moments = np.exp(logs.mean(0) + 2 * logs.std(0))
    bound = 2 * moments
    levels = np.rint((np.minimum(a, bound) / bound) ** p / LEVEL) * LEVEL
    total = levels.sum(0)
    return np.where(total > 0, bound * total ** (1 / p), moments)


def built_estimate(a: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """The per-channel abs-max as the built private scouting round gives it (``quant.private_scout``,
    ``server.rounds.private_scouting`` with ``absmax_rule = "max"``): each client's pass-1 and
    pass-2 numbers quantized as Flower's secaggplus_mod does (stochastic rounding to 2^30 levels
    over [-1, 1]), summed, decoded; ``a``: input key -> (clients, channels)."""
    from types import SimpleNamespace

    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from quant import private_scout as ps
    from server.config import SecureConfig
    from server.secure import secure_tolerance

    np.random.seed(seed)                    # Flower's stochastic rounding draws from numpy's global state
    q = SecureConfig().quantization_range
    keys = sorted(a)
    k = a[keys[0]].shape[0]
    tol = secure_tolerance(SecureConfig(), k)

    def fixed_point_sum(vectors):
        total = np.sum([quantize([v], 1.0, q)[0].astype(np.int64) for v in vectors], axis=0)
        return dequantize([total], 1.0, q)[0] + 1.0 - len(vectors)

    ins = SimpleNamespace(absmax={key: a[key].shape[1] for key in keys})
    us = [np.concatenate([ps._log_u(a[key][i]) for key in keys]) for i in range(k)]
    u_sum = fixed_point_sum(us)
    u2_sum = fixed_point_sum([u * u for u in us])
    first, at = ps.FirstPass(k), 0
    for key in keys:
        c = a[key].shape[1]
        first.u[key], first.u2[key] = u_sum[at:at + c], u2_sum[at:at + c]
        at += c
    bound = ps.bounds(first, tol)
    flat_b = np.concatenate([bound[key] for key in keys])
    reps = [SimpleNamespace(channel_absmax={key: a[key][i] for key in keys}) for i in range(k)]
    s = fixed_point_sum([ps.second_pass_vector(r, ins, flat_b) for r in reps])
    sums, at = {}, 0
    for key in keys:
        sums[key] = s[at:at + a[key].shape[1]]
        at += a[key].shape[1]
    est = ps.absmax_estimate(sums, bound, tol)
    centre = ps.geometric_mean(first)
    return {key: np.maximum(est[key], centre[key].astype(np.float32)).astype(np.float64) for key in keys}


def estimates(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "max":
        return a.max(0)
    if kind == "power16-secure":
        return power_mean_secure(a, 16)
    if kind == "log-moments-z2":
        logs = np.log(np.maximum(a, 1e-30))
        return np.exp(logs.mean(0) + 2 * logs.std(0))
    raise ValueError(kind)


def quality(run_dir: Path, kinds) -> dict:
    """Held-out perplexity per profile of the centralized recipe with each estimate of the
    per-channel abs-max (module docstring)."""
    from dataclasses import replace

    from simulation.evaluation import ServerEval, centralized_qparams
    from simulation.prepare import load_simulation_config, prepare

    cfg = load_simulation_config(ROOT / "configs" / "default.toml")
    prep = prepare(cfg, run_dir, progress=lambda m: print(m, flush=True))
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size)
    out = {}
    for kind in kinds:
        def view(scouting, kind=kind):
            keys = sorted(scouting[0].channel_absmax)
            merged = {k: estimates(kind, np.stack([np.asarray(r.channel_absmax[k], np.float64) for r in scouting]))
                      .astype(np.float32) for k in keys}
            return [replace(r, channel_absmax=merged) for r in scouting]
        t0 = time.perf_counter()
        qps = centralized_qparams(prep, view)
        out[kind] = {p: float(ev(p, qp)["perplexity"]) for p, qp in sorted(qps.items())}
        print(f"{kind}: " + ", ".join(f"{p} {v:.2f}" for p, v in out[kind].items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-poisoning" / "cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "private_absmax.json")
    ap.add_argument("--quality", type=Path, default=None, metavar="RUN_DIR",
                    help="also the perplexity of the centralized recipe with each estimate (SmolLM2, minutes)")
    args = ap.parse_args(argv)
    reps = scouting_absmax(args.cache)
    if len(reps) < 2:
        raise SystemExit(f"{args.cache}: {len(reps)} cached scouting replies; run `python -m bench.poisoning` first")
    keys = sorted(reps[0])
    a = {k: np.stack([r[k] for r in reps]) for k in keys}
    true = {k: v.max(0) for k, v in a.items()}
    logs = {k: np.log(np.maximum(v, 1e-30)) for k, v in a.items()}
    rows = {}
    for z in (0.0, 1.0, 2.0):
        rows[f"log-moments z={z:g}"] = log2_errors({k: np.exp(logs[k].mean(0) + z * logs[k].std(0)) for k in keys}, true)
    for p in (8, 16, 32):
        rows[f"power mean p={p}"] = log2_errors({k: np.sum(v ** p, 0) ** (1 / p) for k, v in a.items()}, true)
    rows["power mean p=16, two secure passes"] = log2_errors({k: power_mean_secure(v, 16) for k, v in a.items()}, true)
    built = built_estimate(a)
    rows["built private scouting (quant.private_scout)"] = log2_errors(built, true) | {
        "below_max": float(np.mean(np.concatenate([built[k] < true[k] * (1 - 1e-6) for k in keys])))}
    res = {"bench": "private_absmax", "clients": len(reps), "inputs": len(keys),
           "channels": int(sum(v.shape[1] for v in a.values())), "log2_estimate_over_max": rows,
           "cache": str(args.cache.relative_to(ROOT)) if args.cache.is_relative_to(ROOT) else str(args.cache),
           "machine": machine()}
    if args.quality is not None:
        t0 = time.perf_counter()
        res["perplexity"] = quality(args.quality, ("max", "power16-secure", "log-moments-z2"))
        res["quality_wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, res)
    print(f"{res['clients']} clients, {res['inputs']} inputs, {res['channels']} channels: log2(estimate / max)")
    for name, r in rows.items():
        print(f"  {name:22s} median {r['median']:+.3f}, 5-95% [{r['p5']:+.3f}, {r['p95']:+.3f}], "
              f"range [{r['min']:+.3f}, {r['max']:+.3f}], off by > 25%: {r['off_by_more_than_25pct']:.1%}")
    return res


if __name__ == "__main__":
    main()

"""Where the mixed profile's error comes from, in the clients' kind of text and out of it (issue 19,
goal 3: mixed is within reach on the held-out roles, +12..16% out of domain).

    .venv/bin/python -m bench.mixed_gap --run runs/splits/default-imp/seed-0   # SmolLM2: an hour on 2 shared cores
    .venv/bin/python -m bench.mixed_gap --run runs/plan-smoke --json gap.json   # a configs/plan-smoke.toml run: seconds
    .venv/bin/python -m bench.mixed_gap --table                                  # README table of the results file

A finished run's final mixed QParams (4-bit asymmetric weights in groups, 8-bit activations, the
fleet's plan of 8-bit weights and int16 activations), taken apart in the ONNX Runtime model as the
server evaluates it (perplexity vs float, KL(float || quantized), top-1, bootstrap intervals over
sequences) on three texts: the clients' own held-out windows (``clients_test``: what a fleet can
measure and choose on), the server's held-out roles (``heldout``) and the CIA World Factbook
(``ood``). Each row changes one thing of the final QParams (``bench.ood_gap``'s stand-ins):

- every activation at int16 over every text's float range (the error of the weights alone), at
  int16 over its calibrated range (clipping kept, rounding removed), and each kind of point so;
- every weight at 8 bits per channel, at 16 bits per channel (the error of the activations alone),
  and each kind of Linear's weights at 8 bits per channel;
- the 4-bit weights' ranges by min-max instead of the fleet's importance.

Float logits of each text are computed once (``--work``/float-logits). Writes
``bench/results/mixed_gap.json`` after every row (a stopped run leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.common import RESULTS, ROOT, command_line, finished_run, machine, quiet_env, shown_run, write_json
from bench.ood_gap import (WIDE_MARGIN, FloatLogits, clipping, evaluate, int16_points, kind_of, point_range,
                           respecified)

PROFILE = "mixed"


class FinalMixed(NamedTuple):
    texts: object               # bench.common.RunTexts: the run's config and texts
    sets: dict                  # clients_test / heldout / ood token windows
    rt: object                  # the profile's DeviceRuntime
    qp: object                  # the run's final QParams of the profile
    base_specs: dict            # the profile's specs before any plan
    floats: FloatLogits         # the float model's logits of each set, computed once


def final_mixed(run: Path, work: Path | None, threads: int, batch_size: int) -> FinalMixed:
    """A finished run's final mixed QParams and what a bench evaluates them with, as its server
    does (float logits of each text under ``work``, default runs/mixed-gap/<run name>);
    SystemExit for a run without them."""
    from client.runtime import DeviceRuntime
    from quant.qparams import load_qparams

    final = run / "qparams" / f"{PROFILE}.safetensors"
    if not final.is_file():
        raise SystemExit(f"{run}: no final QParams of profile {PROFILE!r} ({final})")
    texts = finished_run(run)
    sets = {"clients_test": np.concatenate([c.test for c in texts.clients if len(c.test)]),
            "heldout": texts.evals, "ood": texts.ood}
    rt = DeviceRuntime(run / "device" / PROFILE / "model.onnx", threads=threads)
    base_specs = {k: p.spec for k, p in rt.qparams.points.items()}
    floats = FloatLogits(rt.float_onnx, sets, (work or ROOT / "runs" / "mixed-gap" / run.name) / "float-logits",
                         threads, batch_size)
    return FinalMixed(texts, sets, rt, load_qparams(final), base_specs, floats)


def weight_points(rt, qp, spec_for, keys, importance: bool = True) -> dict:
    """New weight points of ``keys`` (``<path>:weight``): ``spec_for(key)``'s spec from the run's
    float weights, smoothed and rotated as ``qp`` holds them (``server.rounds.planned_qparams``'s
    derivation), ranked by the fleet's importance unless not ``importance``."""
    from quant.qparams import rotation_block
    from quant.smoothing import smoothed_weight_point

    out = {}
    for k in keys:
        path = k.rsplit(":", 1)[0]
        out[k] = smoothed_weight_point(rt.linears[path][0], qp.smoothing.get(path), spec_for(k),
                                       rotation_block(qp, path), qp.importance.get(path) if importance else None)
    return out


def markdown_table(result: dict) -> str:
    def cell(e):
        lo, hi = e["vs_float_pct_ci"]
        return f"{e['vs_float_pct']:+.2f}% [{lo:+.1f}, {hi:+.1f}], KL {e['kl']:.4f}"

    lines = ["| what changed in the final mixed QParams | clients' own text | held-out roles | out of domain |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        n = f" ({r['points']} points)" if "points" in r else f" ({r['weights']} Linears)" if "weights" in r else ""
        lines.append(f"| {r['name']}{n} | {cell(r['clients_test'])} | {cell(r['heldout'])} | {cell(r['ood'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished fedquant simulate run directory (read only)")
    ap.add_argument("--work", type=Path, default=None, help="float logits (default runs/mixed-gap/<run name>)")
    ap.add_argument("--json", type=Path, default=RESULTS / "mixed_gap.json")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only print the README table of --json (no run)")
    args = ap.parse_args(argv)
    if args.table:
        res = json.loads(args.json.read_text())
        print(markdown_table(res))
        return res
    if args.run is None:
        ap.error("--run is required (or --table)")
    quiet_env()
    import onnxruntime

    from quant.spec import weight_spec
    from server.rounds import activation_keys

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    texts, sets, rt, qp, base_specs, floats = final_mixed(args.run, args.work, args.threads, args.batch_size)
    cfg = texts.cfg
    keys = activation_keys(qp)
    wkeys = sorted(k for k in qp.points if k.endswith(":weight") and k.rsplit(":", 1)[0] in rt.linears)
    plan = json.loads(qp.meta.get("plan", "{}"))
    result = {"format": "fedquant.mixed_gap/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "run": shown_run(args.run), "model": cfg.model, "seed": cfg.data.seed, "profile": PROFILE,
              "plan": {"weights8": len(plan.get("weights8", [])), "act16": len(plan.get("act16", [])),
                       "weights": len(wkeys), "activations": len(keys)},
              "texts": {n: {"sequences": int(len(v))} for n, v in sets.items()}, "rows": [],
              "command": command_line("bench.mixed_gap", argv)}

    def row(name: str, new, **about) -> dict:
        r = {"name": name, **about, **evaluate(rt, new, sets, floats, args.batch_size, cfg.data.seed)}
        result["rows"].append(r)
        result.setdefault("float_perplexity", {t: r[t]["float_perplexity"] for t in sets})
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.json, result)
        print(f"{name}: " + "; ".join(f"{t} {r[t]['vs_float_pct']:+.2f}% KL {r[t]['kl']:.4f}" for t in sets)
              + f" ({r['seconds']} s)", file=sys.stderr, flush=True)
        return r

    row("none: the run's final QParams", qp)
    clip = clipping(rt, qp, sets, keys, args.batch_size)
    wide = {k: (WIDE_MARGIN * min(min(c[k]["min"] for c in clip.values()), 0.0),
                WIDE_MARGIN * max(max(c[k]["max"] for c in clip.values()), 0.0)) for k in keys}
    result["clipped_share"] = {t: float(np.mean([c[k]["clipped"] for k in keys])) for t, c in clip.items()}
    row("every activation int16 over every text's range (the weights' error alone)",
        respecified(qp, int16_points(wide), base_specs))
    row("every activation int16 over its calibrated range (clipping kept, rounding removed)",
        respecified(qp, int16_points({k: point_range(qp.points[k]) for k in keys}), base_specs))
    row("every weight 16-bit per channel (the activations' error alone)",
        respecified(qp, weight_points(rt, qp, lambda k: weight_spec(16), wkeys), base_specs))
    row("every weight 8-bit per channel", respecified(qp, weight_points(rt, qp, lambda k: weight_spec(8), wkeys),
                                                      base_specs))
    four = [k for k in wkeys if qp.points[k].spec.bits == 4]
    if any(k.rsplit(":", 1)[0] in qp.importance for k in four):    # a run without them is min-max already
        row("4-bit weight ranges by min-max, not the fleet's importance",
            respecified(qp, weight_points(rt, qp, lambda k: qp.points[k].spec, four, importance=False), base_specs),
            weights=len(four))
    for kind in sorted({kind_of(k) for k in four}):
        lifted = [k for k in four if kind_of(k) == kind]
        row(f"{kind} weights 8-bit per channel, the rest as planned",
            respecified(qp, weight_points(rt, qp, lambda k: weight_spec(8), lifted), base_specs),
            kind=kind, weights=len(lifted))
    for kind in sorted({kind_of(k) for k in keys}):
        lifted = {k: v for k, v in wide.items() if kind_of(k) == kind and qp.points[k].spec.bits != 16}
        if lifted:
            row(f"{kind} inputs int16 over every text's range, the rest as planned",
                respecified(qp, int16_points(lifted), base_specs), kind=kind, points=len(lifted))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.json, result)
    print(markdown_table(result))
    print(f"wrote {args.json} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

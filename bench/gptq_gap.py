"""What GPTQ's rounding (``quant.gptq``) would give a finished run's mixed profile, whose error is its
4-bit weights' once its static inputs are rotated (issue 19, goal 3; ``bench/results/mixed_gap_rotated.json``:
the activations alone are KL 0.003 to float, the weights alone 0.068).

    .venv/bin/python -m bench.gptq_gap --run runs/splits/rotated/seed-0   # SmolLM2: ~10 min a row on 2 shared cores
    .venv/bin/python -m bench.gptq_gap --run runs/plan-smoke --json g.json # a configs/plan-smoke.toml run: seconds
    .venv/bin/python -m bench.gptq_gap --table --json bench/results/gptq_gap_seed0.json

The device rounds each weight to the nearest point of its QParams grid; GPTQ rounds the 4-bit
Linears' weights to minimise their output error on the text whose second moments it is given. Here
that text is every client's training text (what a scouting round reads; the sums are additive, so a
fleet's is its clients'), each 4-bit Linear's input as the graph quantizes it (``x / m``, rotated:
``DeviceRuntime.float_activations``). The run's final QParams are evaluated as the server evaluates
them (``bench.ood_gap.evaluate``: perplexity vs float, KL, top-1, bootstrap intervals) on the
clients' own held-out text, the held-out roles and the Factbook, before and after GPTQ, at each
``--damp``.

A QParams point cannot carry GPTQ's codes (they are not the nearest), so the bench hands the runtime
float weights that lie on GPTQ's grid, rotated back and divided by the factors (``R^T Q / m``): the
runtime's own re-quantization then gives GPTQ's codes, which the bench checks bit for bit before it
evaluates. A measurement, not a protocol: shipping the codes, or the second moments, is a design
change (README, "GPTQ's rounding from the fleet's second moments").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bench.common import RESULTS, command_line, machine, quiet_env, shown_run, write_json
from bench.mixed_gap import PROFILE, final_mixed


class _OnGrid(Mapping):
    """A runtime's float Linears with some weights replaced (GPTQ's, on their grid)."""

    def __init__(self, base, replaced: dict):
        self.base, self.replaced = base, replaced

    def __getitem__(self, path):
        w, b = self.base[path]
        return (self.replaced[path], b) if path in self.replaced else (w, b)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, path) -> bool:
        return path in self.base

    def shape(self, path):
        return self.base.shape(path)


def second_moments(rt, keys: list[str], texts: np.ndarray, batch_size: int) -> tuple[dict, int]:
    """``sum_t x_t x_t^T`` (float64) of each point of ``keys`` over ``texts``, as the statistics job
    sees the inputs (smoothed, rotated), and the token count."""
    h: dict[str, np.ndarray] = {}
    tokens = 0
    for i in range(0, len(texts), batch_size):
        for k, x in rt.float_activations(texts[i:i + batch_size], keys).items():
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            h[k] = h[k] + x.T @ x if k in h else x.T @ x
        tokens += int(np.size(texts[i:i + batch_size]))
    return h, tokens


def gptq_points(rt, qp, moments: Mapping[str, np.ndarray], paths: list[str], damp: float) -> tuple[dict, dict]:
    """GPTQ's weight point of each Linear of ``paths`` and the float weight that the runtime, smoothing
    and rotating it as ``qp`` says, re-quantizes to GPTQ's codes; ValueError if it would not."""
    from quant.affine import quantize
    from quant.gptq import gptq_weight
    from quant.qparams import rotation_block
    from quant.rotation import rotate
    from quant.smoothing import fold_weight

    points, weights = {}, {}
    for p in paths:
        m, b, spec = qp.smoothing.get(p), rotation_block(qp, p), qp.points[f"{p}:weight"].spec
        q, pt = gptq_weight(fold_weight(rt.linears[p][0], m, b), moments[f"{p}:input"], spec, damp)
        back = rotate(q, b, inverse=True) if b else q
        w = (back / m if m is not None else back).astype(np.float32)
        off = int(np.count_nonzero(quantize(fold_weight(w, m, b), pt.scale, pt.zero_point, spec)
                                   != quantize(q, pt.scale, pt.zero_point, spec)))
        if off:
            raise ValueError(f"{p}: {off} of GPTQ's codes do not survive the runtime's re-quantization")
        points[f"{p}:weight"], weights[p] = pt, w
    return points, weights


def _cell(e: dict) -> str:
    lo, hi = e["vs_float_pct_ci"]
    return f"{e['vs_float_pct']:+.2f}% [{lo:+.1f}, {hi:+.1f}], KL {e['kl']:.4f}"


def markdown_table(result: dict) -> str:
    """The README's table of one run's result."""
    return seeds_table([result])


def seeds_table(results: list[dict]) -> str:
    """One table of several runs' results (a seed column), in the order given."""
    lines = ["| seed | the mixed profile's 4-bit weights | clients' own text | held-out roles | out of domain |",
             "|---|---|---|---|---|"]
    lines += [f"| {d['seed']} | {r['name']} | {_cell(r['clients_test'])} | {_cell(r['heldout'])} | {_cell(r['ood'])} |"
              for d in results for r in d["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished fedquant simulate run directory (read only)")
    ap.add_argument("--work", type=Path, default=None, help="float logits (default runs/mixed-gap/<run name>)")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/gptq_gap_seed<data.seed>.json (the README's table reads them all)")
    ap.add_argument("--damp", type=float, nargs="+", default=[0.01],
                    help="GPTQ's dampening, a fraction of the mean diagonal (one row each)")
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="second moments of the first K clients' train text only, a row for each K (default: every "
                         "client's): how much text a fleet's moments need")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only print the README table of --json (no run)")
    args = ap.parse_args(argv)
    if args.table:
        if args.json is None:
            ap.error("--table needs --json")
        res = json.loads(args.json.read_text())
        print(markdown_table(res))
        return res
    if args.run is None:
        ap.error("--run is required (or --table)")
    quiet_env()
    import onnxruntime

    from bench.ood_gap import evaluate, patch, respecified

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    texts, sets, rt, qp, base_specs, floats = final_mixed(args.run, args.work, args.threads, args.batch_size)
    args.json = args.json or RESULTS / f"gptq_gap_seed{texts.cfg.data.seed}.json"
    four = sorted(k.rsplit(":", 1)[0] for k, p in qp.points.items()
                  if k.endswith(":weight") and p.spec.bits == 4 and k.rsplit(":", 1)[0] in rt.linears)
    if not four:
        raise SystemExit(f"{args.run}: no 4-bit Linear weights in its final {PROFILE} QParams")
    keys = [f"{p}:input" for p in four]
    clients = [c.train for c in texts.clients if len(c.train)]
    counts = sorted(set(args.clients)) if args.clients else [len(clients)]
    if counts[0] < 1 or counts[-1] > len(clients):
        raise SystemExit(f"--clients: between 1 and {len(clients)} (the run's clients with train text)")
    result = {"format": "fedquant.gptq_gap/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "run": shown_run(args.run), "model": texts.cfg.model, "seed": texts.cfg.data.seed,
              "profile": PROFILE, "linears": len(four),
              "weights": int(sum(np.prod(rt.linears.shape(p)) for p in four)),    # codes: half a byte each
              "texts": {n: {"sequences": int(len(v))} for n, v in sets.items()}, "rows": [],
              "command": command_line("bench.gptq_gap", argv)}

    def row(name: str, new, **about) -> None:
        r = {"name": name, **about, **evaluate(rt, new, sets, floats, args.batch_size, texts.cfg.data.seed)}
        result["rows"].append(r)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.json, result)
        print(f"{name}: " + "; ".join(f"{t} {r[t]['vs_float_pct']:+.2f}% KL {r[t]['kl']:.4f}" for t in sets)
              + f" ({r['seconds']} s)", file=sys.stderr, flush=True)

    row("round to nearest: the run's final QParams", qp)
    patch(rt, qp)           # the moments of the inputs as the final QParams smooth and rotate them
    moments, tokens, done, base = {}, 0, 0, rt.linears
    result["second_moments"] = []
    for k in counts:
        t0 = time.perf_counter()
        h, t = second_moments(rt, keys, np.concatenate(clients[done:k]), args.batch_size)
        moments = {n: moments[n] + v if n in moments else v for n, v in h.items()}
        tokens += t
        done = k
        result["second_moments"].append({"clients": k, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)})
        text = ("every client's train text" if args.clients is None
                else f"{k} of {len(clients)} clients' train text ({tokens} tokens)")
        for damp in args.damp:
            t0 = time.perf_counter()
            points, weights = gptq_points(rt, qp, moments, four, damp)
            same = [n for n, p in points.items() if np.array_equal(p.scale, qp.points[n].scale)
                    and np.array_equal(p.zero_point, qp.points[n].zero_point)]
            if same:        # the runtime would keep its own codes for these
                raise SystemExit(f"GPTQ kept the run's point for {same[:3]}: its codes cannot be handed over")
            rt.linears = _OnGrid(base, weights)
            try:
                row(f"GPTQ, {text}, damp {damp:g}", respecified(qp, points, base_specs),
                    damp=damp, clients=k, tokens=tokens, gptq_s=round(time.perf_counter() - t0, 1))
            finally:
                rt.linears = base
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.json, result)
    print(markdown_table(result))
    print(f"wrote {args.json} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

"""Where the int8 profile's out-of-domain error comes from, and what a fleet could choose against it
(issue 19, goal 3).

    .venv/bin/python -m bench.ood_gap            # SmolLM2, configs/default.toml's clients: about 30 min
    .venv/bin/python -m bench.ood_gap --quick    # the tiny random-init model (configs/smoke.toml): seconds
    .venv/bin/python -m bench.ood_gap --only targeted   # one part again, into the same results file
    .venv/bin/python -m bench.ood_gap --table    # the README's table from bench/results/ood_gap.json

Like ``bench/smoothing_sweep.py``, the federation's own functions run centrally on every default
client's training text (scouting with per-channel abs-max, SmoothQuant factors, statistics summed,
the range rule of a profile: what a federation in which every client takes part computes under the
exact rules, tests/test_simulate.py). Every variant is evaluated in the ONNX Runtime integer model
as ``simulation.evaluation`` does (perplexity vs float, KL(float || quantized), top-1, bootstrap
intervals over sequences) on three texts: the clients' own held-out text (``clients_test``, what a
fleet can measure and choose on), the server's held-out roles (``heldout``) and the CIA World
Factbook (``ood``). The last two only report: no choice is made on them.

- **Decomposition** of the reference recipe (the run's int8 profile: alpha 0.8, percentile
  99.999, abs-max merged by max as the centralized reference does): weights only (every
  activation at int16 over the range of every text, the closest the QDQ export has to float
  activations), activations only (weights at int16 per channel), activations at int16 over their
  *calibrated* ranges (clipping kept, rounding removed), and each kind of point (q/k/v, o_proj,
  gate/up, down_proj, lm_head inputs) alone lifted to that wide int16. An all-int16 control tells
  what the stand-in itself costs.
- **Clipping**: per point, the share of the float activations (``DeviceRuntime.float_activations``,
  the statistic the fleet collects) outside the calibrated range, and each text's abs-max over the
  range's, on the training text, the held-out roles and the Factbook.
- **Remedies a fleet could choose from its own text**: the range rule (percentile 99.999 /
  99.9999, MSE, min-max of the merged statistics), SmoothQuant alpha, the scouting abs-max rule
  (``clipped`` at 4x the clients' lower median, the default run's, vs plain max), headroom on the
  ranges. ``chosen_on_clients_text`` is the remedy with the lowest KL to float on the clients'
  own text (fidelity: it cannot improve by fitting Shakespeare).
- **Targeted** (``--only targeted``): the same rules on the ``down_proj`` inputs alone, the part
  of the model the decomposition found to carry the out-of-domain error (a config with static
  ``down_proj`` inputs, ``--config configs/quality/static.toml``; the default's are per token).

``--config``: another run config's int8 recipe; ``--unsmoothed '*.down_proj'``: the default's
recipe before its per-token inputs were smoothed (``bench/results/ood_gap_per_token.json``; give it
its own ``--out``). Per-token inputs (the default's ``down_proj``) have no point: no row lifts
them, and their weights stay 8-bit in the int16 rows (``MatMulInteger``'s).

The statistics pool all 24 clients (the run's int8 profile takes its smoothed inputs' statistics
from its own 16; its reference differs by a tenth of a point in domain, half a point out of it).

Float logits of each text are computed once and kept on disk (``--out``/float-logits) so every
variant compares against the same float reference without running it again. Writes
``bench/results/ood_gap.json`` after every variant (a stopped run leaves what it measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, command_line, machine, quiet_env, shown_run, write_json

PROFILE = "int8"
# Kinds of activation point, by the Linear the point feeds (Llama-style names; others: "other").
KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down_proj": ("down_proj",), "lm_head": ("lm_head",)}
WIDE_MARGIN = 1.1          # the lossless stand-in's range: every text's abs-max, with this margin


def kind_of(key: str) -> str:
    leaf = key.rsplit(":", 1)[0].rsplit(".", 1)[-1]
    return next((k for k, leaves in KINDS.items() if leaf in leaves), "other")


class FloatLogits:
    """Each text's float logits, computed once into a memory-mapped file and read back a batch at
    a time in the order ``simulation.evaluation.bounded_batches`` asks for them (checked)."""

    def __init__(self, float_onnx: Path, sets: dict[str, np.ndarray], folder: Path, threads: int, batch_size: int):
        from client.runtime import ort_session

        folder.mkdir(parents=True, exist_ok=True)
        self.sets, self.files = sets, {}
        sess = None
        for name, ids in sets.items():
            tag = hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:12]
            f = folder / f"{name}-{tag}.npy"
            if not f.is_file():
                sess = sess or ort_session(float_onnx, threads=threads)
                first = sess.run(["logits"], {"input_ids": ids[:1]})[0]
                tmp = folder / f".{f.name}"
                out = np.lib.format.open_memmap(tmp, "w+", np.float32, (len(ids), *first.shape[1:]))
                for i in range(0, len(ids), batch_size):
                    out[i:i + batch_size] = sess.run(["logits"], {"input_ids": ids[i:i + batch_size]})[0]
                out.flush()
                del out
                tmp.rename(f)
            self.files[name] = f

    def reader(self, name: str):
        data, ids, at = np.load(self.files[name], mmap_mode="r"), self.sets[name], [0]

        def logits(batch):
            i = at[0]
            if not np.array_equal(batch, ids[i:i + len(batch)]):
                raise RuntimeError(f"{name}: float logits asked out of order at row {i}")
            at[0] += len(batch)
            return np.asarray(data[i:i + len(batch)])
        return logits


def part_of(row: dict) -> str:
    """Which part of the bench (``--only``) measured a row."""
    if row["group"] in ("decomposition", "weights"):
        return row["group"]
    return "targeted" if "kinds" in row else "remedies"


def patch(rt, qp) -> None:
    """Load ``qp`` whatever the runtime holds (a newer version; spec changes named as a plan), every
    field of it (a weight's codes, the importance) as it is."""
    from dataclasses import replace

    rt.patch(replace(qp, version=int(rt.qparams.version) + 1))


def evaluate(rt, qp, sets, floats: FloatLogits, batch_size: int, seed: int) -> dict:
    from simulation.evaluation import fidelity_columns, fidelity_summary

    t0 = time.perf_counter()
    patch(rt, qp)
    out = {name: fidelity_summary(fidelity_columns(rt.logits, ids, batch_size, float_logits=floats.reader(name)),
                                  seed) for name, ids in sets.items()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def respecified(qp, points: dict, base_specs: dict):
    """``qp`` with ``points`` replaced and every point whose spec differs from the profile's named
    in ``meta["plan"]`` (how a device is told to rebuild its graph, ``client.runtime``)."""
    new = qp.with_points(points)
    changed = sorted(k for k, p in new.points.items() if p.spec != base_specs[k])
    # the runtime reads the plan as the names whose spec may change (its int16 weights included)
    new.meta = {**new.meta, "plan": json.dumps({"weights8": [k for k in changed if k.endswith(":weight")],
                                                "act16": [k for k in changed if not k.endswith(":weight")]})}
    return new


def int16_points(ranges: dict[str, tuple[float, float]]) -> dict:
    from quant.affine import range_to_qparams
    from quant.qparams import PointParams
    from quant.spec import activation_spec

    s16 = activation_spec(16)
    return {k: PointParams(s16, *range_to_qparams(lo, hi, s16)) for k, (lo, hi) in ranges.items()}


def point_range(p) -> tuple[float, float]:
    from quant.affine import qparams_to_range

    lo, hi = qparams_to_range(p.scale, p.zero_point, p.spec)
    return float(lo), float(hi)


def clipping(rt, qp, texts: dict[str, np.ndarray], keys: list[str], batch_size: int) -> dict[str, dict]:
    """Per text and point: the share of the float activations that ``qp``'s range clips (more than
    half a step beyond either end: rounding alone errs less) and the text's (min, max), from
    ``rt.float_activations`` (patched to ``qp``: smoothed inputs divided by their factors)."""
    patch(rt, qp)
    rng = {}
    for k in keys:            # beyond half a step past either end: where saturation adds error
        lo, hi = point_range(qp.points[k])
        half = 0.5 * float(np.max(qp.points[k].scale))
        rng[k] = (lo - half, hi + half)
    out = {}
    for name, ids in texts.items():
        n = dict.fromkeys(keys, 0)
        clipped = dict.fromkeys(keys, 0)
        lo = dict.fromkeys(keys, np.inf)
        hi = dict.fromkeys(keys, -np.inf)
        for i in range(0, len(ids), batch_size):
            for k, x in rt.float_activations(ids[i:i + batch_size], keys).items():
                a, b = rng[k]
                n[k] += x.size
                clipped[k] += int(np.count_nonzero((x < a) | (x > b)))
                lo[k], hi[k] = min(lo[k], float(x.min())), max(hi[k], float(x.max()))
        out[name] = {k: {"clipped": clipped[k] / max(n[k], 1), "min": lo[k], "max": hi[k]} for k in keys}
    return out


def clipping_summary(clip: dict, qp, keys: list[str]) -> dict:
    """Per text and kind of point: mean and largest clipped share, and the largest ratio of the
    text's abs-max to the range's; the ten points the Factbook clips most."""
    out: dict = {"by_kind": {}, "top_ood": []}
    for name, per in clip.items():
        by: dict = {}
        for k in keys:
            lo, hi = point_range(qp.points[k])
            reach = max(abs(per[k]["min"]) / max(abs(lo), 1e-30) if per[k]["min"] < 0 else 0.0,
                        per[k]["max"] / max(hi, 1e-30))
            by.setdefault(kind_of(k), []).append((per[k]["clipped"], reach))
        out["by_kind"][name] = {kind: {"points": len(v), "clipped_mean": float(np.mean([c for c, _ in v])),
                                       "clipped_max": float(max(c for c, _ in v)),
                                       "points_clipping_over_1e-4": int(sum(c > 1e-4 for c, _ in v)),
                                       "absmax_over_range_max": float(max(r for _, r in v))}
                                for kind, v in sorted(by.items())}
    if "ood" in clip:
        top = sorted(keys, key=lambda k: -clip["ood"][k]["clipped"])[:10]
        out["top_ood"] = [{"point": k, "range": point_range(qp.points[k]),
                           **{f"{t}_clipped": clip[t][k]["clipped"] for t in clip},
                           **{f"{t}_min_max": (clip[t][k]["min"], clip[t][k]["max"]) for t in clip}} for k in top]
    return out


def markdown_table(result: dict) -> str:
    """The README's table: every row on the three texts (change vs float [95%], KL), in order."""
    texts = ("clients_test", "heldout", "ood")

    def cell(e):
        return "{:+.1f}% [{:+.1f}, {:+.1f}], {:.3f}".format(e["vs_float_pct"], *e["vs_float_pct_ci"], e["kl"])
    lines = ["| part | variant | clients' own text: vs float [95%], KL | held-out roles | out of domain (Factbook) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {part_of(r)} | {r['name']} | " + " | ".join(cell(r[t]) for t in texts) + " |")
    return "\n".join(lines) + "\n"


# the int8 recipes the README compares: the results file, and what its recipe is
RECIPES = (("ood_gap.json", "static `down_proj` inputs"),
           ("ood_gap_per_token.json", "per token, unsmoothed"),
           ("ood_gap_per_token_smoothed.json", "per token, smoothed"),
           ("ood_gap_rotated.json", "per token, smoothed, rotated"),
           ("ood_gap_lmhead.json", "lm_head per token too"))


def recipes_table(results: dict[str, dict]) -> str:
    """The decomposition rows several results files share, one column per recipe: held-out roles
    and out of domain, change vs float and KL (``results``: recipe label -> results JSON)."""
    rows = [r["name"] for r in next(iter(results.values()))["rows"] if r["group"] == "decomposition"]
    by = {label: {r["name"]: r for r in res["rows"] if r["group"] == "decomposition"} for label, res in results.items()}
    rows = [n for n in rows if all(n in b for b in by.values())]

    def cell(r):
        h, o = r["heldout"], r["ood"]
        return f"{h['vs_float_pct']:+.1f}%, KL {h['kl']:.3f} / {o['vs_float_pct']:+.1f}%, KL {o['kl']:.3f}"
    lines = ["| variant (held-out roles / out of domain) | " + " | ".join(results) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {n} | " + " | ".join(cell(by[label][n]) for label in results) + " |" for n in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random-init model of configs/smoke.toml")
    ap.add_argument("--config", type=Path, default=None,
                    help="the run config whose int8 recipe is taken apart (default configs/default.toml)")
    ap.add_argument("--unsmoothed", nargs="+", default=[], metavar="PATTERN",
                    help="int8 Linears left unsmoothed (smoothing.skip), e.g. '*.down_proj'")
    ap.add_argument("--out", type=Path, default=None, help="the prepared run directory (default runs/ood-gap[-quick])")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="only print the README table of --json (no run)")
    ap.add_argument("--only", choices=("decomposition", "weights", "remedies", "targeted"), default=None,
                    help="one part; its rows replace that part's in an existing --json, the others are kept")
    args = ap.parse_args(argv)
    if args.table:
        res = json.loads((args.json or RESULTS / "ood_gap.json").read_text())
        print(markdown_table(res))
        return res
    quiet_env()
    import onnxruntime

    from client.jobs import scout, statistics
    from client.runtime import DeviceRuntime
    from quant.calibrate import CalibratorConfig
    from quant.qparams import PointParams, QParams, per_token_linears
    from quant.smoothing import smoothed_weight_point
    from quant.spec import weight_spec
    from quant.wire import Instruction
    from server.aggregate import clip_scouting, grids_from_scouting, ranges_for_profile, sum_statistics
    from server.rounds import (activation_keys, scout_instruction, smoothable_paths, smoothed_qparams,
                               smoothed_scouting, smoothing_from_scouting)
    from simulation.prepare import load_simulation_config, prepare, server_weights

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    config = (args.config or ROOT / "configs" / ("smoke.toml" if args.quick else "default.toml")).resolve()
    out = args.out or ROOT / "runs" / ("ood-gap-quick" if args.quick else "ood-gap")
    json_path = args.json or (out / "ood_gap.json" if args.quick else RESULTS / "ood_gap.json")
    cfg = load_simulation_config(config)
    if args.unsmoothed and cfg.server.smoothing is not None:
        sm = cfg.server.smoothing
        sm = type(sm).model_validate({**sm.model_dump(), "skip": {**sm.skip, PROFILE: args.unsmoothed}})
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"smoothing": sm})})
    scfg = cfg.server
    prep = prepare(cfg, out, progress=lambda m: print(m, file=sys.stderr))
    weights = server_weights(prep)
    rt = DeviceRuntime(prep.device_dir / PROFILE / "model.onnx", threads=cfg.threads)
    held = prep.initial[PROFILE]
    base_specs = {k: p.spec for k, p in held.points.items()}
    keys = activation_keys(held)
    paths = smoothable_paths({PROFILE: held}, scfg, weights)
    train = np.concatenate([c.train for c in prep.clients if len(c.train)])
    sets = {"clients_test": np.concatenate([c.test for c in prep.clients if len(c.test)]),
            "heldout": prep.evals, "ood": prep.ood}
    bs, seed = args.batch_size, cfg.data.seed
    floats = FloatLogits(prep.float_onnx, sets, out / "float-logits", cfg.threads, bs)
    ins = scout_instruction(0, held, {f"{p}:input": int(weights[p].shape[1]) for p in paths})
    scouting = [scout(rt, ins, c.train, batch_size=scfg.batch_size)[0] for c in prep.clients]
    print(f"scouted {len(scouting)} clients", file=sys.stderr)
    alpha0 = scfg.smoothing.alpha_for(PROFILE)
    cal0 = scfg.calibrator_for(PROFILE)

    recipes: dict = {}

    def recipe(alpha: float, absmax_rule: str):
        """The smoothed starting QParams and the pooled statistics of one (alpha, abs-max rule)."""
        if (alpha, absmax_rule) not in recipes:
            t0 = time.perf_counter()
            sc = clip_scouting(scouting, scfg.absmax_clip) if absmax_rule == "clipped" else scouting
            factors = smoothing_from_scouting(sc, paths, weights, alpha, scfg)
            sm = [smoothed_scouting(r, factors) for r in sc]
            init = smoothed_qparams(held, factors, weights, sm)
            patch(rt, init)
            grids = grids_from_scouting(sm, scfg.bins, scfg.grid_margin, scfg.grid_quantile)
            sins = Instruction(round=0, job="stats", qparams=init, keys=tuple(sorted(grids)), grids=grids)
            merged = sum_statistics([statistics(rt, sins, c.train, batch_size=scfg.batch_size)[0].stats
                                     for c in prep.clients])
            recipes[(alpha, absmax_rule)] = (init, merged)
            print(f"recipe alpha {alpha} {absmax_rule}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return recipes[(alpha, absmax_rule)]

    def calibrated(alpha, absmax_rule, cal: CalibratorConfig, headroom: float = 1.0, kinds=None) -> QParams:
        """The recipe's ranges by ``cal`` widened ``headroom`` times; with ``kinds``, only the points
        of those kinds, the others by the profile's own rule."""
        from quant.affine import range_to_qparams

        init, merged = recipe(alpha, absmax_rule)
        specs = {k: init.points[k].spec for k in keys if k in merged and merged[k].n > 0}
        mine = {k: v for k, v in specs.items() if kinds is None or kind_of(k) in kinds}
        pts = {**ranges_for_profile(merged, {k: v for k, v in specs.items() if k not in mine}, cal0),
               **ranges_for_profile(merged, mine, cal)}
        pts.update({k: PointParams(pts[k].spec, *range_to_qparams(*(headroom * v for v in point_range(pts[k])),
                                                                   pts[k].spec))
                    for k in mine if headroom != 1.0})
        return respecified(init, pts, base_specs)

    result = {"format": "fedquant.ood_gap/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "shared_machine": "other jobs ran beside this one (timings are indicative)",
              "model": cfg.model, "config": shown_run(config), "profile": PROFILE,
              "seq_len": cfg.data.seq_len,
              "texts": {"train": {"sequences": int(len(train)), "clients": len(prep.clients)},
                        **{n: {"sequences": int(len(v))} for n, v in sets.items()}},
              "reference_recipe": {"alpha": alpha0, "absmax_rule": "max", "calibrator": cal0.model_dump(),
                                   "statistics": "summed over every client (exact)"},
              "rows": [],
              "command": command_line("bench.ood_gap", argv)}

    def row(group: str, name: str, qp: QParams, **about) -> dict:
        r = {"group": group, "name": name, **about, **evaluate(rt, qp, sets, floats, bs, seed)}
        result["rows"].append(r)
        result.setdefault("float_perplexity", {t: r[t]["float_perplexity"] for t in sets})
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(json_path, result)
        print(f"{group} {name}: " + "; ".join(f"{t} {r[t]['vs_float_pct']:+.2f}% KL {r[t]['kl']:.4f}"
                                             for t in sets) + f" ({r['seconds']} s)", file=sys.stderr, flush=True)
        return r

    if args.only and json_path.is_file():      # the other parts' rows and findings, as measured before
        before = json.loads(json_path.read_text())
        result["rows"] = [r for r in before.get("rows", []) if part_of(r) != args.only]
        result.update({k: before[k] for k in ("clipping", "float_perplexity") if k in before})
        result["earlier_commands"] = [*before.get("earlier_commands", []), before.get("command")]
    ref = calibrated(alpha0, "max", cal0)
    per_token = set(per_token_linears(ref))     # their weights stay 8-bit: MatMulInteger's
    w16 = {f"{p}:weight": smoothed_weight_point(weights[p], ref.smoothing.get(p, np.ones(weights[p].shape[1],
                                                                                          np.float32)),
                                                weight_spec(16))
           for p in weights if f"{p}:weight" in ref.points and p not in per_token}
    if args.only in (None, "decomposition"):
        clip = clipping(rt, ref, {"train": train, "heldout": sets["heldout"], "ood": sets["ood"]}, keys, bs)
        result["clipping"] = clipping_summary(clip, ref, keys)
        write_json(json_path, result)
        wide = {k: (WIDE_MARGIN * min(min(c[k]["min"] for c in clip.values()), 0.0),
                    WIDE_MARGIN * max(max(c[k]["max"] for c in clip.values()), 0.0)) for k in keys}
        at_ranges = {k: point_range(ref.points[k]) for k in keys}
        row("decomposition", "A8W8: the reference recipe", ref)
        row("decomposition", "control: all int16 (activations over every text's range, weights per channel)",
            respecified(ref, {**int16_points(wide), **w16}, base_specs))
        row("decomposition", "W8 only: activations int16 over every text's range", respecified(ref, int16_points(wide),
                                                                                              base_specs))
        row("decomposition", "A8 only: weights int16 per channel", respecified(ref, w16, base_specs))
        row("decomposition", "activations int16 at the calibrated ranges (clipping kept, rounding removed)",
            respecified(ref, int16_points(at_ranges), base_specs))
        for kind in sorted({kind_of(k) for k in keys}):
            lifted = {k: v for k, v in wide.items() if kind_of(k) == kind}
            row("decomposition", f"{kind} inputs int16 over every text's range, the rest A8W8",
                respecified(ref, int16_points(lifted), base_specs), kind=kind, points=len(lifted))
    if args.only in (None, "weights"):
        # which Linears' 8-bit weights the error is in: one kind's weights at 16 bits at a time
        for kind in sorted({kind_of(k) for k in w16}):
            lifted = {k: v for k, v in w16.items() if kind_of(k) == kind}
            row("weights", f"{kind} weights int16 per channel, the rest A8W8", respecified(ref, lifted, base_specs),
                kind=kind, weights=len(lifted))
    if args.only in (None, "remedies"):
        remedies = [("range rule", {"cal": CalibratorConfig(method="percentile", percentile=99.9999)}),
                    ("range rule", {"cal": CalibratorConfig(method="mse")}),
                    ("range rule", {"cal": CalibratorConfig(method="minmax")}),
                    ("headroom", {"headroom": 1.25}), ("headroom", {"headroom": 1.5}), ("headroom", {"headroom": 2.0}),
                    ("absmax rule", {"absmax_rule": "clipped"}),
                    ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 0.65}), ("alpha", {"alpha": 0.9})]
        # again after the decomposition's rebuilt graphs: the same recipe must give the same figures
        row("remedy", "reference", ref, alpha=alpha0, absmax_rule="max", calibrator=cal0.model_dump(), headroom=1.0)
        for what, kw in remedies:
            alpha, rule = kw.get("alpha", alpha0), kw.get("absmax_rule", "max")
            cal, room = kw.get("cal", cal0), kw.get("headroom", 1.0)
            name = f"{what}: " + ", ".join(f"{k} {v.method if k == 'cal' else v}" +
                                            (f" {v.percentile}" if k == "cal" and v.method == "percentile" else "")
                                            for k, v in kw.items())
            row("remedy", name, calibrated(alpha, rule, cal, room), alpha=alpha, absmax_rule=rule,
                calibrator=cal.model_dump(), headroom=room)
    if args.only in (None, "targeted") and not any(kind_of(k) == "down_proj" for k in keys):
        print("no down_proj input points (per token?): the targeted rows would all be the reference's",
              file=sys.stderr)
    elif args.only in (None, "targeted"):
        # the decomposition's finding: the down_proj inputs carry the out-of-domain error (clipping)
        dp = ("down_proj",)
        targeted = [("down_proj inputs min-max", {"cal": CalibratorConfig(method="minmax")}),
                    ("down_proj inputs headroom 2", {"headroom": 2.0}),
                    ("down_proj inputs headroom 4", {"headroom": 4.0}),
                    ("down_proj inputs headroom 8", {"headroom": 8.0}),
                    ("down_proj inputs min-max, headroom 2", {"cal": CalibratorConfig(method="minmax"),
                                                              "headroom": 2.0}),
                    ("down_proj inputs headroom 4, abs-max clipped (the default run's scouting rule)",
                     {"headroom": 4.0, "absmax_rule": "clipped"})]
        for name, kw in targeted:
            cal, room, rule = kw.get("cal", cal0), kw.get("headroom", 1.0), kw.get("absmax_rule", "max")
            row("remedy", name, calibrated(alpha0, rule, cal, room, dp), alpha=alpha0, absmax_rule=rule,
                calibrator=cal.model_dump(), headroom=room, kinds=list(dp))
    candidates = [r for r in result["rows"] if r["group"] == "remedy"]     # the reference among them
    if candidates:
        best = min(candidates, key=lambda r: r["clients_test"]["kl"])
        result["chosen_on_clients_text"] = {"rule": "lowest KL to float on the clients' own held-out text",
                                            "name": best["name"]}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(json_path, result)
    print(markdown_table(result))
    print(f"wrote {json_path} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

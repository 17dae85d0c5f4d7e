"""The mixed profile's plan chosen by the fleet against the hand-written one (issue 19, goal 4), from
two finished runs of ``fedquant simulate``:

    fedquant simulate --config configs/default.toml --out runs/default                   # the fleet's plan
    fedquant simulate --config configs/quality/handplan.toml --out runs/q-handplan       # the hand list
    .venv/bin/python -m bench.fleet_plan --fleet runs/default --hand runs/q-handplan     # -> bench/results/fleet_plan.json

What the fleet chose (``plan.json``: which weights at 8 bits, which activation points at int16, the
average weight bits) and its overlap with the hand-written list (configs/quality/handplan.toml's
overrides) and with the centralized reference's plan from the pooled text; then, per run and
profile, the last evaluation round's perplexity, KL and top-1 agreement with float on the held-out
roles and on out-of-domain text, the centralized reference's, and the plan round's traffic and wall
time. ``--hand`` may be left out (the fleet's run alone), and a run whose report (the centralized
reference, ``summary.json``) has not finished gives its evaluation rounds alone. No simulation runs
here: the figures are the runs' ``metrics.jsonl``, ``summary.json`` and ``plan.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, write_json


def hand_list(config: Path, profile: str = "mixed") -> dict:
    """The hand-written plan: the overrides of ``profile``'s fleet entry, expanded to point keys of
    the plan's own report (fnmatch patterns such as ``*.down_proj:weight``)."""
    from simulation.prepare import load_simulation_config

    cfg = load_simulation_config(config)
    entry = next(e for e in cfg.fleet if e.load().name == profile)
    return {k: s.bits for k, s in entry.overrides.items()}


def _expand(patterns: dict, keys, bits: int) -> list[str]:
    return sorted(k for k in keys if any(fnmatch.fnmatchcase(k, p) for p, b in patterns.items() if b == bits))


def _eval(d: dict | None) -> dict | None:
    if not d:
        return None
    out = {k: d.get(k) for k in ("perplexity", "vs_float_pct", "kl", "top1", "float_perplexity")}
    if d.get("ood"):
        out["ood"] = {k: d["ood"].get(k) for k in ("perplexity", "vs_float_pct", "kl", "top1", "float_perplexity")}
    return out


def run_figures(run: Path) -> dict:
    """Per profile, each evaluation round's figures (``metrics.jsonl``'s server-side evaluation) and,
    when the run finished its report (``summary.json``), the centralized reference's; the plan
    round's traffic and time."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    f = run / "summary.json"
    summary = json.loads(f.read_text()) if f.is_file() else {}
    profiles = sorted({p for m in lines for p in (m.get("server_eval") or {})})
    out = {"name": json.loads((run / "run.json").read_text())["config"]["name"], "wall_s": summary.get("wall_s"),
           "machine": summary.get("machine"), "report_finished": bool(summary),
           "schedule": [m["job"] for m in lines], "profiles": {}}
    for p in profiles:
        evals = [_eval(m["server_eval"][p]) | {"round": m["round"]} for m in lines if (m.get("server_eval") or {}).get(p)]
        d = (summary.get("profiles") or {}).get(p, {})
        out["profiles"][p] = {"float_ppl": evals[-1]["float_perplexity"], "centralized": _eval(d.get("centralized")),
                              "federated_by_eval_round": evals}
    plan_round = next((m for m in lines if m["job"] == "plan"), None)
    if plan_round is not None:
        out["plan_round"] = {k: plan_round[k] for k in ("round", "sampled", "replies", "rejections", "wall_s",
                                                         "bytes_up_per_client", "bytes_down_per_client")}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", type=Path, required=True, help="run directory of configs/default.toml")
    ap.add_argument("--hand", type=Path, default=None, help="run directory of configs/quality/handplan.toml")
    ap.add_argument("--hand-config", type=Path, default=ROOT / "configs" / "quality" / "handplan.toml")
    ap.add_argument("--json", type=Path, default=RESULTS / "fleet_plan.json")
    args = ap.parse_args(argv)

    plan = json.loads((args.fleet / "plan.json").read_text())
    prof = next(k for k in plan if k != "round")
    p = plan[prof]
    keys = list(p["sensitivity"])
    hand = hand_list(args.hand_config, prof)
    hand_w8, hand_a16 = _expand(hand, [k for k in keys if k.endswith(":weight")], 8), \
        _expand(hand, [k for k in keys if not k.endswith(":weight")], 16)
    summary = json.loads((args.fleet / "summary.json").read_text())
    central = summary["profiles"][prof].get("plan", {}).get("centralized_overlap", {})
    sens = p["sensitivity"]
    res = {"profile": prof, "plan_round": plan["round"], "budget": p["budget"], "rule": p["rule"], "clients": p["clients"],
           "fleet": {"weights8": p["weights8"], "act16": p["act16"], "avg_weight_bits": p["avg_weight_bits"],
                     "act16_share": p["act16_share"]},
           "hand": {"weights8": hand_w8, "act16": hand_a16, "config": str(args.hand_config.resolve().relative_to(ROOT))},
           "overlap_with_hand": {"weights8": len(set(hand_w8) & set(p["weights8"])),
                                 "act16": len(set(hand_a16) & set(p["act16"])),
                                 "hand_act16_share_of_fleet_sensitivity": sum(sens.get(k, 0.0) for k in hand_a16)
                                 / max(sum(sens[k] for k in p["act16"]), 1e-300)},
           "overlap_with_centralized": {k: central.get(k) for k in ("weights8", "act16")},
           "centralized_plan_sizes": {k: len(central.get(f"centralized_{k}", [])) for k in ("weights8", "act16")},
           "top_sensitivity": dict(list(sens.items())[:20]),
           "runs": {"fleet": run_figures(args.fleet)}}
    if args.hand is not None:
        res["runs"]["hand"] = run_figures(args.hand)
    res["machine"] = machine()
    write_json(args.json, res)
    f = res["runs"]["fleet"]["profiles"][prof]["federated_by_eval_round"][-1]
    print(f"fleet plan: {len(p['weights8'])} weights at 8 bits ({p['avg_weight_bits']:.2f} bits), {len(p['act16'])} "
          f"int16 points; with the hand list: {res['overlap_with_hand']}; final {prof} ppl {f['perplexity']:.2f} "
          f"({f['vs_float_pct']:+.2f}%)")
    if args.hand is not None:
        h = res["runs"]["hand"]["profiles"][prof]["federated_by_eval_round"][-1]
        print(f"hand plan: final {prof} ppl {h['perplexity']:.2f} ({h['vs_float_pct']:+.2f}%)")
    return res


if __name__ == "__main__":
    main()

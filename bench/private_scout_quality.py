"""What private scouting costs SmolLM2 (docs/privacy.md, "Private scouting"): two runs that differ
only in the scouting round, private (``configs/secure.toml``) or in the clear
(``configs/secure-clear-scouting.toml``), both with secure statistics rounds, through the first
eval round (scout, 2 statistics rounds, eval: the learned-range rounds would add their own noise)::

    fedquant simulate --config configs/secure.toml --rounds 4 --out runs/secure --prepared-from runs/default
    fedquant simulate --config configs/secure-clear-scouting.toml --rounds 4 --out runs/secure-clear --prepared-from runs/default
    .venv/bin/python -m bench.private_scout_quality runs/secure runs/secure-clear

Reads the runs' ``metrics.jsonl``: per profile, the eval round's server-side perplexity on the 64
held-out sequences (vs float, with its interval) and on the out-of-domain ones, and the scouting
round's wall time and payload bytes per client.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, machine, write_json


def summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scout = next(m for m in lines if m["job"] == "scout")
    ev = next(m for m in lines if m["job"] == "eval" and m.get("server_eval"))
    out = {"config": json.loads((run / "run.json").read_text())["config"]["name"],
           "scout": {"wall_s": scout["wall_s"], "replies": scout["replies"],
                     "bytes_down_per_client": scout["bytes_down_per_client"],
                     "bytes_up_per_client": scout["bytes_up_per_client"]},
           "eval_round": ev["round"], "profiles": {}}
    if "secure" in scout:
        out["scout"]["secure_bytes"] = scout["secure"]["bytes"]
    for p, e in sorted(ev["server_eval"].items()):
        out["profiles"][p] = {"perplexity": e["perplexity"], "vs_float_pct": e["vs_float_pct"],
                              "vs_float_pct_ci": e["vs_float_pct_ci"], "kl": e["kl"], "top1": e["top1"],
                              "ood_perplexity": e["ood"]["perplexity"], "ood_vs_float_pct": e["ood"]["vs_float_pct"]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("private", type=Path, help="run directory of configs/secure.toml")
    ap.add_argument("clear", type=Path, help="run directory of configs/secure-clear-scouting.toml")
    ap.add_argument("--out", type=Path, default=RESULTS / "private_scout_quality.json")
    args = ap.parse_args(argv)
    res = {"bench": "private_scout_quality", "private": summary(args.private), "clear": summary(args.clear),
           "machine": machine()}
    write_json(args.out, res)
    for name in ("private", "clear"):
        r = res[name]
        print(f"{name:8s} scout {r['scout']['wall_s']:.1f} s, {r['scout']['bytes_up_per_client'] / 1e6:.2f} MB up; "
              + ", ".join(f"{p} {v['perplexity']:.2f} ({v['vs_float_pct']:+.2f}% vs float), ood {v['ood_perplexity']:.2f}"
                          for p, v in r["profiles"].items()))
    return res


if __name__ == "__main__":
    main()

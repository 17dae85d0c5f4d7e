"""Regenerate the README's result tables from the JSON that produced them.

    .venv/bin/python -m bench.readme_tables [--quality runs/quality/quality.json]
                                            [--simulate runs/default/summary.json]
                                            [--quality-bench bench/results/quality_bench.json]

(and bench/results/evaluate_run.json, bench/results/latency.json, mixed_plan.json when present)

Copies the quality run's JSON to bench/results/quality.json and the main job's summary to
bench/results/simulate_default.json (so the README's numbers stay next to their source) and rewrites the blocks between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from bench.common import RESULTS, ROOT


def quality_block(q: dict) -> str:
    from simulation.quality import markdown_table

    m, c = q["machine"], q["config"]
    return (f"Measured by `fedquant quality` ({c['model']}, {c['calib_sequences']} calibration and "
            f"{c['eval_sequences']} evaluation sequences of {c['seq_len']} tokens, {c['bins']} bins; "
            f"{q['eval_tokens']} held-out tokens from {q['split']['heldout_roles']} unseen roles; "
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {q['wall_s']:.0f} s; torch "
            f"fake-quant, not yet the ONNX Runtime integer model). Source: `bench/results/quality.json`.\n\n"
            + markdown_table(q))


def calibrators_block(d: dict) -> str:
    specs = list(d["specs"])
    methods = ["minmax", "percentile", "mse", "entropy", "torch_histogram", "ort_entropy_2048",
               "ort_percentile", "ort_distribution"]
    lines = ["| mean SQNR (dB) over 13 points | " + " | ".join(specs) + " |",
             "|---|" + "---|" * len(specs)]
    for meth in methods:
        cells = []
        for s in specs:
            summ = d["specs"][s]["summary"]
            v = summ["mean_sqnr_db"].get(meth)
            best = summ["best_count"].get(meth, 0)
            cells.append("" if v is None else f"{v:.2f} (best on {best})")
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    m = d["machine"]
    return ("Rows `minmax` ... `entropy` are ours; `torch_histogram` is PyTorch's HistogramObserver, "
            "`ort_*` ONNX Runtime's calibrators. 'best on N': the points (of 13) where the method is "
            f"within {d['tie_db']} dB of the best. {m['cpu']}, torch {m['torch']}, ORT "
            f"{m['onnxruntime']}; `.venv/bin/python -m bench.calibrators` ({d['wall_seconds']:.0f} s).\n\n"
            + "\n".join(lines) + "\n")


def simulate_block(d: dict) -> str:
    """The main job's table, from a `fedquant simulate` summary.json."""
    m = d["machine"]
    lines = ["| profile | clients | float | random-token calibration | centralized (pooled data) "
             "| federated, per evaluation round | last vs float |",
             "|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.2f}"
    for p, s in d["profiles"].items():
        fed = s["federated_ppl"]
        last = f"{100 * (fed[-1] / s['float_ppl'] - 1):+.1f}%" if fed and s["float_ppl"] else "-"
        lines.append(f"| {p} | {s['clients']} | {f(s['float_ppl'])} | {f(s['random_calib_ppl'])} | "
                     f"{f(s['centralized_ppl'])} | {' -> '.join(f(v) for v in fed)} | {last} |")
    data = d["data"]
    return (f"`fedquant simulate --config configs/default.toml` ({d['model']}, {d['clients']} clients, "
            f"{d['rounds']} rounds; {data['train_sequences']} training sequences of {data['seq_len']} tokens "
            f"in all, perplexity on {data['eval_sequences']} sequences of roles no client holds, ONNX "
            f"Runtime integer model; {_cpu(m)}, {m['cores']} cores, {d['wall_s']:.0f} s of which "
            f"{d['prepare_s']:.0f} s preparing). Source: `bench/results/simulate_default.json`.\n\n"
            + "\n".join(lines) + "\n")


def _cpu(m: dict) -> str:
    """The CPU as a results file records it: model and SIMD flags when it has them (older files
    record only the architecture)."""
    if m.get("cpu_model"):
        return f"{m['cpu_model']} ({' '.join(m.get('simd', [])) or 'no AVX2'})"
    return f"{m['cpu']}, CPU flags not recorded"


def quality_bench_block(d: dict) -> str:
    """Issue 5's benchmark table, from bench/quality.py's quality_bench.json."""
    from bench.quality import markdown_table

    m, c, data, lat = d["machine"], d["config"], d["data"], d["latency"]
    cmd = "`make bench-quality`, i.e. `fedquant simulate` of each run, then " if "--runs" in d.get("command", "") else ""
    return (f"{cmd}`.venv/bin/python -m bench.quality` ({c['model']}, the clients and held-out roles of "
            f"`{c['path']}`: {data['pooled_train_sequences']} pooled training sequences for the peers' "
            f"calibration, perplexity on {data['eval_sequences']} held-out sequences of {c['seq_len']} "
            f"tokens; every row runs in ONNX Runtime {m['onnxruntime']}; latency: median of "
            f"{lat['runs']} runs of a {lat['batch'][0]} x {lat['batch'][1]} batch on 1 thread, the ratio to "
            f"float measured interleaved; integer MatMuls: integer kernels / all matmul nodes ORT runs, "
            f"attention matmuls included; {m['cpu']}, {m['cores']} cores, {d['wall_s']:.0f} s). "
            f"Source: `bench/results/quality_bench.json`.\n\n" + markdown_table(d))


def mixed_plan_block(d: dict) -> str:
    """The mixed profile's design measurements, from bench/mixed_plan.py's mixed_plan.json."""
    f, plan, data = d["float"], d["plan"], d["data"]
    lines = ["| weights only (activations float) | clients' own held-out text | held-out roles |",
             "|---|---|---|",
             f"| float | {f['clients_test']:.2f} | {f['heldout']:.2f} |"]
    for r in d["weights_only"]:
        lines.append(f"| {r['recipe']} | {r['clients_test']:.2f} ({r['clients_test_increase_pct']:+.1f}%) | "
                     f"{r['heldout']:.2f} ({r['heldout_increase_pct']:+.1f}%) |")
    layers = ", ".join(k.split(".")[2] for k in plan["int16"])
    return (f"`.venv/bin/python -m bench.mixed_plan` (torch, {data['train_sequences']} pooled training "
            f"sequences, {d['wall_s']:.0f} s; source `bench/results/mixed_plan.json`).\n\n" + "\n".join(lines)
            + f"\n\nint16 `down_proj` inputs by the plan: layers {layers} ({len(plan['int16'])} of "
            f"{plan['activation_points']} activation points); the config's overrides "
            f"{'match' if plan['matches_config'] else 'do not match'} it. Average weight bits "
            f"{plan['avg_weight_bits']:.2f}.\n")


def latency_block(d: dict) -> str:
    """Issue 16's latency/size table, from bench/latency.py's latency.json."""
    from bench.latency import table

    return (f"`.venv/bin/python -m bench.latency --run {d['run']}` (the run's final QParams exported "
            f"per profile; {d['wall_s']:.0f} s). Source: `bench/results/latency.json`.\n\n" + table(d) + "\n")


def poisoning_block(d: dict) -> str:
    """Issue 14's poisoning table, from bench/poisoning.py's poisoning.json."""
    from bench.poisoning import readme_table

    return readme_table(d)


def secure_rounds_block(d: dict) -> str:
    """Issue 15's SecAgg+ cost table, from bench/secure_rounds.py's secure_rounds.json."""
    from bench.secure_rounds import table

    m = d["machine"]
    return (f"`.venv/bin/python -m bench.secure_rounds` (tiny model, one 32-token sequence per client, 512 bins; "
            f"Flower {d['versions'].get('flwr')} simulation engine, 2 Ray actors; {_cpu(m)}, {m['cores']} cores shared "
            f"with other jobs, {_secure_walls(d)}). Source: `bench/results/secure_rounds.json`.\n\n" + table(d))


def _secure_walls(d: dict) -> str:
    """The bench's wall time; with rows merged from an earlier invocation (`--merge`), both."""
    if not d.get("kept_wall_s"):
        return f"{d['wall_s']:.0f} s"
    rerun = ", ".join(str(r["clients"]) for r in d["rows"] if "row_wall_s" in r)
    return f"{d['kept_wall_s']:.0f} s, and {d['wall_s']:.0f} s for the {rerun}-client row run later with `--merge`"


def dp_quality_block(d: dict) -> str:
    """Issue 15's epsilon table, from bench/dp_quality.py's dp_quality.json."""
    from bench.dp_quality import table

    m = d["machine"]
    earlier = d.get("default_from_earlier_run")
    split = (f" for the 1,000-client rows, {earlier['wall_s']:.0f} s for the default fleet's (`--skip-default` kept "
             f"them from an earlier run of the same code)" if earlier else "")
    return (f"`.venv/bin/python -m bench.dp_quality --run runs/default` ({d['model']}, delta 1e-5, one noise "
            f"draw per row; {_cpu(m)}, {m['cores']} cores shared with other jobs, {d['wall_s']:.0f} s{split}). "
            f"Source: `bench/results/dp_quality.json`.\n\n" + table(d))


def splits_block(d: dict, source: str = "splits.json") -> str:
    """Issue 19's any-split table, from bench/splits.py's splits.json (or another run of it)."""
    from bench.splits import table

    m = d["machine"]
    walls = [v["wall_s"] for v in d["seeds"].values() if v.get("wall_s")]
    took = f"{min(walls) / 60:.0f}-{max(walls) / 60:.0f} min each" if walls else "time not recorded"
    return (f"`.venv/bin/python -m bench.splits` (`{d['config']}`, `data.seed` {', '.join(d['seeds'])}; one "
            f"`fedquant simulate` each, {took} up to its report (`summary.json`'s `wall_s`: without the "
            f"centralized reference); {_cpu(m)}, {m['cores']} cores shared with other jobs). Source: "
            f"`bench/results/{source}`.\n\n" + table(d))


def per_token_block(d: dict, source: str = "per_token.json") -> str:
    """Per-token inputs on finished runs' models, from bench/per_token.py's JSON."""
    from bench.per_token import markdown_table

    m = d["machine"]
    runs = ", ".join(f"`{r['run']}`" for r in d["runs"])
    command = d.get("command", "python -m bench.per_token").replace("python -m", ".venv/bin/python -m", 1).strip()
    ran_on = f"; code of {d['ran_on']}" if d.get("ran_on") else ""
    return (f"`{command}` (the {d['profile']} model and final QParams of {runs}; each run's held-out roles and "
            f"the Factbook windows, as its server evaluates them; ONNX Runtime {m.get('onnxruntime')}, "
            f"{d['threads']} threads; {_cpu(m)}, {m['cores']} cores shared with other jobs{ran_on}; "
            f"{d['wall_s']:.0f} s). Source: `bench/results/{source}`.\n\n" + markdown_table(d))


def mixed_gap_block(d: dict, source: str = "mixed_gap.json") -> str:
    """The mixed profile taken apart, from bench/mixed_gap.py's JSON."""
    from bench.mixed_gap import markdown_table

    m, t, p = d["machine"], d["texts"], d["plan"]
    return (f"`.venv/bin/python -m bench.mixed_gap --run {d['run']}` (its final mixed QParams: {p['weights8']} of "
            f"{p['weights']} weights at 8 bits and {p['act16']} of {p['activations']} activations at int16 by the "
            f"fleet's plan; {t['clients_test']['sequences']} windows of the clients' own held-out text, "
            f"{t['heldout']['sequences']} of the held-out roles, {t['ood']['sequences']} of the Factbook; ONNX "
            f"Runtime {m.get('onnxruntime')}; {_cpu(m)}, {m['cores']} cores shared with other jobs; code of "
            f"{d.get('ran_on', 'not recorded')}; {d['wall_s']:.0f} s). Source: `bench/results/{source}`."
            f"\n\n" + markdown_table(d))


def gptq_gap_block(results: list[dict], files: list[str], baseline_once: bool = False) -> str:
    """bench/gptq_gap.py on several runs (one file each): GPTQ's rounding of their 4-bit weights;
    ``baseline_once``: a run's unchanged first row shown only with its first file."""
    from bench.gptq_gap import seeds_table

    def tokens(d: dict) -> int:     # a list since --clients (one entry per count), one dict before
        m = d["second_moments"]
        return (m[-1] if isinstance(m, list) else m)["tokens"]

    m = results[0]["machine"]
    runs = "; ".join(f"`{d['command'].replace('python ', '.venv/bin/python ', 1)}`: {d['linears']} 4-bit Linears, second "
                     f"moments of {tokens(d):,} tokens, {d['wall_s']:.0f} s, code of "
                     f"{d.get('ran_on', 'not recorded')}" for d in results)
    shown, seen = [], set()
    for d in results:
        first = (d["run"], d["rows"][0]["name"])
        shown.append(d if not (baseline_once and first in seen) else {**d, "rows": d["rows"][1:]})
        seen.add(first)
    return (f"{runs} (ONNX Runtime {m.get('onnxruntime')}; {_cpu(m)}, {m['cores']} cores shared with other jobs). "
            "Sources: " + ", ".join(f"`bench/results/{f}`" for f in files) + ".\n\n" + seeds_table(shown))


def ood_gap_recipes_block(results: dict[str, dict]) -> str:
    """bench/ood_gap.py's decomposition of the int8 recipes (``bench.ood_gap.RECIPES``) side by side."""
    from bench.ood_gap import recipes_table

    m = next(iter(results.values()))["machine"]
    n = {2: "two", 3: "three", 4: "four", 5: "five"}.get(len(results), str(len(results)))
    return (f"`.venv/bin/python -m bench.ood_gap` on {n} int8 recipes ({_cpu(m)}, {m['cores']} cores shared "
            "with other jobs). Sources: " + ", ".join(f"`bench/results/{f}`" for f, _ in OOD_RECIPES)
            + ".\n\n" + recipes_table(results))


def weight_ranges_block(d: dict, source: str = "weight_ranges.json") -> str:
    """bench/weight_ranges.py: the final QParams of runs with their weight points searched."""
    from bench.weight_ranges import markdown_table

    m = d["machine"]
    runs = ", ".join(f"`{r['run']}`" for r in d["runs"])
    return (f"`{d['command']}` (the final QParams of {runs}, evaluated as the server evaluates them; "
            f"ONNX Runtime {m.get('onnxruntime')}, {d['threads']} threads; {_cpu(m)}, {m['cores']} cores shared "
            f"with other jobs; {d['wall_s']:.0f} s). Source: `bench/results/{source}`.\n\n" + markdown_table(d))


def replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", re.S)
    new = f"<!-- {name}:begin -->\n{body}<!-- {name}:end -->"
    if not pat.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> block")
    return pat.sub(lambda _: new, text)


from bench.ood_gap import RECIPES as OOD_RECIPES  # noqa: E402


def _evaluate_run_block(d: dict) -> str:
    from bench.evaluate_run import readme_block

    return readme_block(d)


# (README marker, results file, the block from the file's JSON): each shown where both exist
BLOCKS = [("mixed-plan", "mixed_plan.json", mixed_plan_block),
          ("evaluate-run", "evaluate_run.json", _evaluate_run_block),
          ("latency", "latency.json", latency_block),
          ("secure-rounds", "secure_rounds.json", secure_rounds_block),
          ("poisoning", "poisoning.json", poisoning_block),
          ("dp-quality", "dp_quality.json", dp_quality_block),
          *[(marker, name, lambda d, name=name: splits_block(d, name)) for marker, name in (
              ("splits", "splits.json"), ("splits-runtime", "splits_runtime.json"),
              ("splits-torch-lsq", "splits_torch_lsq.json"),
              ("splits-oproj", "splits_oproj.json"), ("splits-lmhead", "splits_lmhead.json"),
              ("splits-per-token", "splits_per_token.json"), ("splits-static", "splits_static.json"),
              ("splits-rotated", "splits_rotated.json"), ("splits-gptq", "splits_gptq.json"))],
          ("mixed-gap", "mixed_gap.json", mixed_gap_block),
          ("mixed-gap-rotated", "mixed_gap_rotated.json", lambda d: mixed_gap_block(d, "mixed_gap_rotated.json")),
          ("per-token", "per_token.json", per_token_block),
          ("per-token-all", "per_token_all.json", lambda d: per_token_block(d, "per_token_all.json")),
          ("weight-ranges", "weight_ranges.json", weight_ranges_block),
          ("weight-ranges-splits", "weight_ranges_splits.json",
           lambda d: weight_ranges_block(d, "weight_ranges_splits.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality", type=Path, default=ROOT / "runs" / "quality" / "quality.json")
    ap.add_argument("--simulate", type=Path, default=ROOT / "runs" / "default" / "summary.json")
    ap.add_argument("--quality-bench", type=Path, default=RESULTS / "quality_bench.json",
                    help="bench/quality.py's JSON (the quality-bench block)")
    args = ap.parse_args()
    readme = (ROOT / "README.md").read_text()
    if args.quality.is_file() and args.quality.resolve() != (RESULTS / "quality.json").resolve():
        shutil.copyfile(args.quality, RESULTS / "quality.json")
    if args.simulate.is_file():   # paths inside the checkout kept relative to it (no machine's path in the repo)
        (RESULTS / "simulate_default.json").write_text(args.simulate.read_text().replace(f'"{ROOT}/', '"'))
    if (RESULTS / "simulate_default.json").is_file():
        readme = replace_block(readme, "simulate",
                               simulate_block(json.loads((RESULTS / "simulate_default.json").read_text())))
    q = json.loads((RESULTS / "quality.json").read_text())
    readme = replace_block(readme, "quality", quality_block(q))
    readme = replace_block(readme, "calibrators",
                           calibrators_block(json.loads((RESULTS / "calibrators.json").read_text())))
    if args.quality_bench.is_file():
        if args.quality_bench.resolve() != (RESULTS / "quality_bench.json").resolve():
            shutil.copyfile(args.quality_bench, RESULTS / "quality_bench.json")
        if "<!-- quality-bench:begin -->" in readme:
            readme = replace_block(readme, "quality-bench", quality_bench_block(
                json.loads((RESULTS / "quality_bench.json").read_text())))
        else:
            print("README.md has no <!-- quality-bench:begin --> block: quality_bench.json not shown")
    for marker, name, block in BLOCKS:
        f = RESULTS / name
        if f.is_file() and f"<!-- {marker}:begin -->" in readme:
            readme = replace_block(readme, marker, block(json.loads(f.read_text())))
    if all((RESULTS / f).is_file() for f, _ in OOD_RECIPES) and "<!-- ood-gap-recipes:begin -->" in readme:
        readme = replace_block(readme, "ood-gap-recipes", ood_gap_recipes_block(
            {label: json.loads((RESULTS / f).read_text()) for f, label in OOD_RECIPES}))
    clients = RESULTS / "gptq_gap_clients_seed0.json"     # GPTQ from fewer clients' moments
    if clients.is_file() and "<!-- gptq-clients:begin -->" in readme:
        readme = replace_block(readme, "gptq-clients", gptq_gap_block([json.loads(clients.read_text())], [clients.name]))
    domains = sorted(RESULTS.glob("gptq_gap_factbook_seed*.json")) + sorted(RESULTS.glob("gptq_gap_both_seed*.json"))
    if domains and "<!-- gptq-domains:begin -->" in readme:     # GPTQ from another domain's moments
        domains.sort(key=lambda f: (f.name.rsplit("seed", 1)[1], "both" in f.name))
        readme = replace_block(readme, "gptq-domains", gptq_gap_block([json.loads(f.read_text()) for f in domains],
                                                                      [f.name for f in domains], baseline_once=True))
    gptq = sorted(RESULTS.glob("gptq_gap_seed*.json"))
    if gptq and "<!-- gptq-gap:begin -->" in readme:
        readme = replace_block(readme, "gptq-gap", gptq_gap_block([json.loads(f.read_text()) for f in gptq],
                                                                  [f.name for f in gptq]))
    if (RESULTS / "runtime_ranges_output.json").is_file() and "<!-- runtime-ranges:begin -->" in readme:
        from bench.runtime_ranges import readme_block as runtime_ranges_block

        def load(name):
            f = RESULTS / name
            return json.loads(f.read_text()) if f.is_file() else None
        readme = replace_block(readme, "runtime-ranges", runtime_ranges_block(
            load("runtime_ranges_output.json"), load("client_jobs_runtime.json"), load("client_jobs.json")))
    (ROOT / "README.md").write_text(readme)
    print("README.md tables regenerated")


if __name__ == "__main__":
    main()

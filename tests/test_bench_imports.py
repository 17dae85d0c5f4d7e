"""Every bench module and the README table generator import: a renamed helper in bench/common.py
once broke `python -m bench.latency` and `bench.readme_tables` with no test noticing."""

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name):
    mod = importlib.import_module(f"bench.{name}")
    assert mod.__name__ == f"bench.{name}"


def test_readme_tables_render_every_results_file():
    """Each block the README shows renders from the JSON committed beside it."""
    import json

    from bench import readme_tables as rt
    from bench.common import RESULTS

    rendered = {
        "latency": rt.latency_block(json.loads((RESULTS / "latency.json").read_text())),
        "poisoning": rt.poisoning_block(json.loads((RESULTS / "poisoning.json").read_text())),
        "mixed-plan": rt.mixed_plan_block(json.loads((RESULTS / "mixed_plan.json").read_text())),
        "weight-ranges": rt.weight_ranges_block(json.loads((RESULTS / "weight_ranges.json").read_text())),
        "mixed-gap": rt.mixed_gap_block(json.loads((RESULTS / "mixed_gap.json").read_text())),
        "mixed-gap-rotated": rt.mixed_gap_block(json.loads((RESULTS / "mixed_gap_rotated.json").read_text()),
                                                "mixed_gap_rotated.json"),
        "gptq-gap": rt.gptq_gap_block([json.loads(f.read_text()) for f in sorted(RESULTS.glob("gptq_gap_seed*.json"))],
                                      [f.name for f in sorted(RESULTS.glob("gptq_gap_seed*.json"))]),
        "ood-gap-recipes": rt.ood_gap_recipes_block({label: json.loads((RESULTS / f).read_text())
                                                     for f, label in rt.OOD_RECIPES}),
    }
    for name, body in rendered.items():
        assert "| " in body and "source" in body.lower(), name
    # GPTQ from another domain's moments: two files a run, its unchanged first row shown once
    domains = sorted(RESULTS.glob("gptq_gap_factbook_seed*.json")) + sorted(RESULTS.glob("gptq_gap_both_seed*.json"))
    results = [json.loads(f.read_text()) for f in domains]
    body = rt.gptq_gap_block(results, [f.name for f in domains], baseline_once=True)
    runs = {d["run"] for d in results}
    assert len(domains) >= 2 and body.count("| round to nearest: the run's final QParams |") == len(runs)
    assert body.count("| GPTQ, ") == len(domains)

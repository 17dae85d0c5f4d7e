"""bench.client_jobs in its quick mode (tiny Llama): every measured thing runs in its own
subprocess and the JSON carries the per-job medians, the ratios to the plain passes and the targets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_writes_ratios(tmp_path):
    out = tmp_path / "client_jobs.json"
    p = subprocess.run([sys.executable, "-m", "bench.client_jobs", "--quick",
                        "--out", str(out), "--steps", "2"],
                       capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    ratios = res["ratios"]
    for job in ("stats", "learn", "learn_runtime", "plan"):
        for base in ("float", "int"):
            for q in ("time", "memory"):
                r = ratios[f"{job}_{q}_vs_{base}"]
                assert math.isfinite(r) and r > 0, (job, q, base, r)
    # each target is the ratio it names, compared with its bound
    for name, t in res["targets"].items():
        assert t["ratio"] == ratios[name] and t["met"] == (t["ratio"] <= t["at_most"])
    assert set(res["targets"]) == {"stats_time_vs_float", "stats_memory_vs_float", "learn_runtime_time_vs_int",
                                   "learn_runtime_memory_vs_int"}
    med = res["medians"]
    for kind in ("float", "int", "stats", "learn", "learn_runtime", "patch", "plan"):
        assert len(res["raw"][kind]) == res["reps"] == 1
        assert med[kind]["warm_wall_s"] > 0 and med[kind]["baseline_mb"] > 0
    # the patch split adds up, and every activation point was patched
    p = med["patch"]
    assert math.isclose(p["cold_total_s"], p["cold_compute_s"] + p["cold_patch_s"] + p["cold_session_s"],
                        rel_tol=1e-6)
    assert res["raw"]["patch"][0]["cold"]["last_patch"]["changed"] > 0
    assert res["statistics_instruction"]["bins"] == 512 and res["statistics_instruction"]["absmax_points"] == 2
    assert med["learn"]["steps"] == 2 and res["batch"]["seq_len"] == 32
    assert res["machine"]["cores"] >= 1 and res["versions"]["onnxruntime"]
    jm = res["raw"]["learn_runtime"][0]["cold"]["job_metrics"]
    assert res["learn_runtime_config"]["method"] == "runtime" and jm["points"] == res["learn_runtime_points"] > 0
    assert jm["loss_after"] <= jm["loss_before"]


def test_a_subset_of_kinds_keeps_the_bases(tmp_path):
    out = tmp_path / "client_jobs_runtime.json"
    p = subprocess.run([sys.executable, "-m", "bench.client_jobs", "--quick", "--out", str(out),
                        "--kinds", "learn_runtime"], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["kinds"] == ["float", "int", "learn_runtime"] and set(res["raw"]) == set(res["kinds"])
    assert set(res["targets"]) == {"learn_runtime_time_vs_int", "learn_runtime_memory_vs_int"}
    assert res["learn_config"] is None and res["ratios"]["learn_runtime_time_vs_int"] > 0

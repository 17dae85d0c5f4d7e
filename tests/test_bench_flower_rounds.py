"""bench.flower_rounds in its quick mode: 10 simulated clients on Flower's Ray backend (tiny
Llama), fedquant's scout and stats rounds beside bare Flower rounds of the same messages, the pure
aggregation timing and the bytes against the float weight bytes, all in one JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.bench      # about a minute: Ray starts and 10 clients run 4 rounds
def test_quick_bench_writes_rounds_bare_rounds_bytes_and_aggregation(tmp_path):
    out = tmp_path / "flower_rounds.json"
    p = subprocess.run([sys.executable, "-m", "bench.flower_rounds", "--quick", "--out", str(out),
                        "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=400, cwd=str(ROOT), env={**os.environ, **QUIET_ENV})
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and list(res["runs"]) == ["10"] and res["lsq_run_for"] == []

    run = res["runs"]["10"]
    # fedquant's rounds: every client sampled and accepted, times and bytes from metrics.jsonl
    assert list(run["jobs"]) == ["scout", "stats"]
    for job, j in run["jobs"].items():
        assert j["sampled"] == j["replies"] == 10 and j["rejections"] == {}, (job, j)
        assert _pos(j["wall_s"]) and math.isclose(j["per_message_s"], j["wall_s"] / 10)
        assert math.isclose(j["replies_per_s"], 10 / j["wall_s"])
        assert math.isclose(j["vs_bare_per_message"], j["per_message_s"] / run["bare_per_message_s"])
        assert _pos(j["bytes_down_per_client"]) and _pos(j["bytes_up_per_client"])
    assert run["jobs"]["scout"]["roster_joined"] == 10 and run["jobs"]["stats"]["roster_joined"] == 0

    # bare rounds: the stats instruction's arrays down, a real stats reply's arrays up, all answered
    bare, size = run["bare_rounds"], run["bare_payload"]
    assert [b["when"] for b in bare] == ["before", "after"]
    for b in bare:
        assert b["messages"] == b["replies"] == 10 and _pos(b["wall_s"])
        assert b["reply_array_bytes"] == 10 * size["reply"]["array_bytes"]
    assert run["bare_median_s"] == bare[1]["wall_s"]          # the cold first round is left out
    assert math.isclose(run["bare_per_message_s"], run["bare_median_s"] / 10)
    ins = size["instruction"]
    assert ins["arrays"] >= 4 and "float64" in ins["dtypes"]   # QParams + the stats grids
    stats = run["jobs"]["stats"]
    assert ins["array_bytes"] < stats["bytes_down_per_client"] <= ins["array_bytes"] + ins["header_chars"]
    assert size["reply"]["array_bytes"] in size["probe_reply_array_bytes"]
    assert size["reply"]["array_bytes"] < stats["bytes_up_per_client"] * 2

    # bytes against the float weight bytes: measured for the tiny model, computed for SmolLM2
    tiny, smol = res["bytes"]["tiny-llama"], res["bytes"]["smollm2"]
    assert smol["float_weight_bytes"] == 134_515_008 * 4 and 0 < tiny["float_weight_bytes"] < 10_000_000
    assert tiny["per_job"]["stats"]["down"] == stats["bytes_down_per_client"]
    for b in (tiny, smol):
        for job, v in b["per_job"].items():
            assert math.isclose(v["total_vs_float"], (v["down"] + v["up"]) / b["float_weight_bytes"]), job
    assert set(smol["per_job"]) == {"scout", "stats", "lsq"}
    assert smol["per_job"]["stats"]["up"] > smol["per_job"]["lsq"]["up"]   # 211 x 512 bins vs 2 x 211 floats

    # aggregation: decode/validate and apply_round timed apart, on the tiny model's real points
    agg = res["aggregation"]["tiny-llama"]
    assert agg["replies"] == res["aggregation_replies"] == 20 and agg["points"] >= 1
    for k in ("stats_validate_s", "stats_aggregate_s", "lsq_validate_s", "lsq_aggregate_s"):
        assert _pos(agg[k]), k
    assert math.isclose(agg["stats_total_s"], agg["stats_validate_s"] + agg["stats_aggregate_s"])

    # every target is its value against its bound
    t = res["targets"]
    assert {"stats_per_message_vs_bare_N10", "lsq_bytes_vs_float_weights_smollm2",
            "aggregate_tiny-llama", "validate_plus_aggregate_tiny-llama"} <= set(t)
    assert t["stats_per_message_vs_bare_N10"]["value"] == stats["vs_bare_per_message"]
    assert t["lsq_bytes_vs_float_weights_smollm2"]["value"] == smol["per_job"]["lsq"]["total_vs_float"]
    for name, v in t.items():
        assert v["met"] == (v["value"] <= v["at_most"]), name
    assert res["machine"]["cores"] >= 1 and res["machine"]["versions"]["flwr"].startswith("1.42")

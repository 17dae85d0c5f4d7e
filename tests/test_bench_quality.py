"""bench/quality.py in quick mode (the smoke config's tiny model): the JSON's rows and columns, the
plot, a fedquant row taken from a hand-written run directory, and the README block."""

import json
import shutil
from pathlib import Path

import pytest

from bench import quality, readme_tables


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run with a fake `fedquant simulate` run directory whose final model is the
    pooled-data MinMax peer model (so the fedquant row's re-evaluation has a real QDQ model)."""
    tmp = tmp_path_factory.mktemp("quality")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDQUANT_CACHE", str(tmp / "cache"))
    first = quality.main(["--quick", "--out", str(tmp / "a"), "--only", "ort-minmax", "ort-percentile",
                          "torch-histogram", "--latency-runs", "1"])
    run = tmp / "runs" / "smoke"
    (run / "export" / "int8").mkdir(parents=True)
    peer = Path(first["cache"]).expanduser() / "ort-minmax.onnx"
    shutil.copyfile(peer, run / "export" / "int8" / "model.onnx")
    fl = first["float_perplexity"]
    minmax = next(r for r in first["rows"] if r["recipe"] == "ort-minmax")["perplexity"]
    summary = {"format": "fedquant.run/1", "name": "smoke", "model": "tiny-llama", "rounds": 3,
               "clients": 6, "data": {"eval_sequences": first["data"]["eval_sequences"]},
               "profiles": {"int8": {
                   "float_ppl": fl, "random_calib_ppl": fl * 1.2, "centralized_ppl": fl * 1.1,
                   "federated_ppl": [fl * 1.1, minmax], "clients": 4,
                   "bytes_up_per_client_round": [{"round": 1, "job": "scout", "bytes": 100.0},
                                                 {"round": 2, "job": "stats", "bytes": 1000.0}],
                   "bytes_down_per_client_round": [{"round": 1, "job": "scout", "bytes": 50.0},
                                                   {"round": 3, "job": "eval", "bytes": 25.0}]}}}
    (run / "summary.json").write_text(json.dumps(summary))
    metrics = [{"round": 1, "job": "scout", "bytes": {"int8": {"up_per_client": 100, "down_per_client": 50}}},
               {"round": 2, "job": "stats", "bytes": {"int8": {"up_per_client": 1000}}},
               {"round": 3, "job": "eval", "server_eval": {"int8": {"perplexity": fl * 1.1}},
                "bytes": {"int8": {"down_per_client": 25}}},
               {"round": 4, "job": "lsq", "bytes": {"int8": {"up_per_client": 10, "down_per_client": 20}}},
               {"round": 5, "job": "lsq", "bytes": {"int8": {"up_per_client": 10, "down_per_client": 20}}},
               {"round": 6, "job": "eval", "server_eval": {"int8": {"perplexity": minmax}}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    second = quality.main(["--quick", "--out", str(tmp / "b"), "--only", "ort-minmax", "--latency-runs", "1",
                           "--runs", f"{run}=fedquant smoke", str(tmp / "runs" / "missing")])
    mp.undo()
    return first, second, tmp


def test_rows_columns_and_plot(quick):
    first, _, tmp = quick
    doc = json.loads((tmp / "a" / "quality_bench.json").read_text())
    assert doc["format"] == quality.FORMAT
    assert {"platform", "cores", "torch", "onnxruntime"} <= set(doc["machine"])
    assert doc["data"]["eval_sequences"] > 0 and doc["data"]["pooled_train_sequences"] > 0
    assert [r["recipe"] for r in doc["rows"]] == ["float", "ort-minmax", "ort-percentile", "torch-histogram"]
    keys = {"label", "recipe", "source", "profile", "perplexity", "increase_pct", "integer_share",
            "latency_ms", "rounds", "bytes_per_client", "seconds"}
    for r in doc["rows"]:
        assert keys <= set(r), r["recipe"]
        assert 0.0 <= r["integer_share"] <= 1.0
        assert r["latency_ms"] > 0
    fl = doc["rows"][0]
    assert fl["source"] == "float" and fl["increase_pct"] == 0 and fl["integer_share"] == 0
    assert fl["perplexity"] == doc["float_perplexity"]
    assert fl["ood_perplexity"] > 1 and doc["data"]["ood_sequences"] == 8
    for r in doc["rows"][1:]:
        assert r["source"] == "peer" and r["profile"] == "int8"
        # fidelity to float beside perplexity, on the held-out roles and the out-of-domain text
        assert r["kl"] > 0 and 0 < r["top1"] <= 1 and r["vs_float_pct"] == pytest.approx(r["increase_pct"], abs=1e-3)
        assert r["kl_ci"][0] <= r["kl"] <= r["kl_ci"][1]
        assert r["ood"]["kl"] > 0 and r["ood"]["sequences"] == 8
        assert r["integer_share"] > 0, r["recipe"]           # ORT fused the QDQ MatMuls
        assert r["increase_pct"] == pytest.approx(100 * (r["perplexity"] / fl["perplexity"] - 1), abs=1e-3)
        assert r["raw_data_leaves_clients"] is True
        assert r["kernels"].get("MatMulIntegerToFloat", 0) > 0, r["recipe"]   # integer math, not MatMulNBits
    hist = doc["rows"][3]["settings"]
    assert hist["points"] > 0 and hist["observed_tensors"] <= hist["points"]   # activation points calibrated
    ort = doc["rows"][1]["settings"]
    assert ort["weights_shifted_to_u8"] > 0 and ort["extra_options"]["CalibStridedMinMax"] == 1
    assert (tmp / "a" / "quality_bench.png").stat().st_size > 1000


def test_peer_models_are_cached(quick):
    first, second, _ = quick
    assert first["cache"] == second["cache"]
    by = {r["recipe"]: r for r in second["rows"]}
    assert by["ort-minmax"]["settings"]["cached"] is True
    assert by["ort-minmax"]["perplexity"] == pytest.approx(
        next(r for r in first["rows"] if r["recipe"] == "ort-minmax")["perplexity"], rel=1e-6)


def test_fedquant_row_from_summary(quick):
    _, second, _ = quick
    refs = {r["recipe"]: r for r in second["rows"] if r["source"] == "reference"}   # the first run's references
    assert refs["smoke:random_calib_ppl"]["perplexity"] == pytest.approx(second["float_perplexity"] * 1.2)
    assert refs["smoke:centralized_ppl"]["raw_data_leaves_clients"] is True
    fed = [r for r in second["rows"] if r["source"] == "fedquant"]
    assert len(fed) == 2            # one row per server-side evaluation; the missing run directory is skipped
    stats, r = fed
    assert stats["label"] == "fedquant smoke, scout+stats (int8)" and stats["rounds"] == 2
    assert stats["bytes_per_client"] == 100 + 50 + 1000 + 25 and "perplexity_rerun" not in stats
    assert r["label"] == "fedquant smoke, scout+stats+lsqx2 (int8)" and r["profile"] == "int8" and r["rounds"] == 4
    assert r["bytes_per_client"] == 100 + 1000 + 50 + 25 + 60
    assert r["bytes_up_per_client"] == 1120 and r["bytes_down_per_client"] == 115
    assert r["perplexity_rerun"] == pytest.approx(r["perplexity"], rel=1e-5)
    # a run from before fidelity: the last row's KL and top-1 are measured on its final model here
    assert "kl" not in stats and r["fidelity_from"] == "rerun of the final model" and r["kl"] > 0
    assert 0 < r["integer_share"] <= 1 and r["latency_ms"] > 0
    assert r["increase_pct"] == pytest.approx(100 * (r["perplexity"] / r["float_ppl_run"] - 1), abs=1e-3)


def test_readme_block(quick):
    _, second, _ = quick
    block = readme_tables.quality_bench_block(second)
    lines = block.splitlines()
    assert any(ln.startswith("| row |") for ln in lines)
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| row")]
    assert len(table) == len(second["rows"])
    assert "fedquant smoke, scout+stats+lsqx2 (int8)" in block and "bench/results/quality_bench.json" in block
    text = "a\n<!-- quality-bench:begin -->\nold\n<!-- quality-bench:end -->\nb\n"
    new = readme_tables.replace_block(text, "quality-bench", block)
    assert "old" not in new and block in new and new.startswith("a\n") and new.endswith("b\n")


def test_profile_budget_counts_bits_by_numel(tmp_path):
    """A profile's budget: numel-weighted weight bits and the activation points at 16 bits."""
    import numpy as np

    from quant.affine import range_to_qparams
    from quant.qparams import PointParams, QParams, save_qparams
    from quant.spec import activation_spec, weight_spec

    w_big, w_small = np.ones((8, 64), np.float32), np.ones((4, 16), np.float32)   # 512 and 64 elements
    w4, w8 = weight_spec(4, group_size=16, symmetric=False), weight_spec(8)
    points = {"big:weight": PointParams(w4, *range_to_qparams(np.zeros((8, 4)), np.ones((8, 4)), w4)),
              "small:weight": PointParams(w8, *range_to_qparams(np.zeros(4), np.ones(4), w8)),
              "big:input": PointParams(activation_spec(16), *range_to_qparams(-1.0, 1.0, activation_spec(16))),
              "small:input": PointParams(activation_spec(8), *range_to_qparams(0.0, 1.0, activation_spec(8)))}
    (tmp_path / "initial").mkdir()
    save_qparams(QParams(points, "m"), tmp_path / "initial" / "mixed.safetensors")
    (tmp_path / "device" / "mixed").mkdir(parents=True)
    np.savez(tmp_path / "device" / "mixed" / "model.weights.npz", **{"w:big": w_big, "w:small": w_small})
    b = quality.profile_budget(tmp_path, "mixed")
    assert b == {"avg_weight_bits": round((4 * 512 + 8 * 64) / 576, 3), "act16_points": 1, "act_points": 2}
    assert quality.profile_budget(tmp_path, "int8") == {}           # no such profile in the run


def test_results_name_paths_under_home_as_tilde(tmp_path, monkeypatch):
    """A committed result must not name a developer's machine: the cache under the home directory
    is recorded as ``~/...``; paths elsewhere stay as they are."""
    from bench.common import shown_path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert shown_path(tmp_path / ".cache" / "fedquant" / "bench") == "~/.cache/fedquant/bench"
    assert shown_path("/opt/elsewhere/x.onnx") == "/opt/elsewhere/x.onnx"
    assert shown_path("runs/default") == "runs/default"

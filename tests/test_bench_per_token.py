"""bench/per_token.py on a tiny-model run directory: the static row is the server's own evaluation,
the rewritten model runs one MatMulInteger per down_proj, and the run directory is left alone."""

import json

import numpy as np
import pytest

from bench import per_token


def test_per_token_rows_on_a_run(smoke_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    res = per_token.main(["--runs", str(smoke_run), "--eval-sequences", "8", "--ood-sequences", "6",
                          "--threads", "1", "--reps", "2", "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(res))
    assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()} == before
    (row,) = res["runs"]
    assert row["linears"] == 2                                   # tiny-llama: two layers
    assert row["kernels"]["per_token"].get("MatMulInteger") == 2
    assert "MatMulInteger" not in row["kernels"]["static"]
    fused = lambda k: k.get("MatMulIntegerToFloat", 0) + k.get("QLinearMatMul", 0)
    assert fused(row["kernels"]["static"]) - fused(row["kernels"]["per_token"]) == 2
    for v in ("static", "per_token"):
        for text in ("heldout", "ood"):
            e = row["variants"][v][text]
            assert e["kl"] >= 0 and 0 < e["top1"] <= 1 and e["vs_float_pct_ci"][0] <= e["vs_float_pct_ci"][1]
    # the two variants are different models (the down_proj inputs changed), on the same float reference
    assert row["variants"]["static"]["heldout"]["perplexity"] != row["variants"]["per_token"]["heldout"]["perplexity"]
    assert row["variants"]["static"]["heldout"]["float_perplexity"] == \
        row["variants"]["per_token"]["heldout"]["float_perplexity"]
    assert row["latency_s"]["per_token_over_static"] > 0
    assert "inputs per token" in per_token.markdown_table(res)


def test_refuses_what_is_not_a_run_or_matches_nothing(smoke_run, tmp_path):
    with pytest.raises(SystemExit, match="no run.json"):
        per_token.main(["--runs", str(tmp_path), "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="match no Linear"):
        per_token.main(["--runs", str(smoke_run), "--linears", "*.nope", "--eval-sequences", "4",
                        "--ood-sequences", "4", "--threads", "1", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_a_moved_run_directory_still_finds_its_float_graph(smoke_run, tmp_path):
    """A bundle names the float graph by absolute path; a device directory moved since uses its own
    ``float.onnx`` (the static runs of the splits bench were moved to runs/splits/static)."""
    import shutil

    from client.runtime import DeviceRuntime, bundle_path

    moved = tmp_path / "moved"
    shutil.copytree(smoke_run / "device", moved / "device")
    doc = json.loads(bundle_path(moved / "device" / "int8" / "model.onnx").read_text())
    doc["float_onnx"] = str(tmp_path / "gone" / "device" / "float.onnx")      # where it was
    bundle_path(moved / "device" / "int8" / "model.onnx").write_text(json.dumps(doc))
    rt = DeviceRuntime(moved / "device" / "int8" / "model.onnx")
    assert rt.float_onnx == moved / "device" / "float.onnx"
    key = rt.activation_keys()[0]
    acts = rt.float_activations(np.array([[1, 2, 3, 4]], np.int64), [key])   # the float graph runs from there
    assert acts[key].shape[:2] == (1, 4)


def test_a_run_with_some_inputs_per_token_gets_the_rest_rewritten(tmp_path):
    """A run whose own graph quantizes the down_proj inputs per token (as the default's int8 did):
    ``--linears`` over down_proj and o_proj rewrites only the o_proj inputs, on top of the run's."""
    from test_simulate import SMOKE, simulate

    cfg = tmp_path / "down.toml"
    cfg.write_text(SMOKE.read_text().replace('profile = "int8"\nshare = 2\n',
                                             'profile = "int8"\nshare = 2\nper_token = ["*.down_proj"]\n'))
    run = tmp_path / "run"
    simulate(run, "--rounds", "2", config=cfg)
    res = per_token.main(["--runs", str(run), "--linears", "*.down_proj", "*.o_proj", "--eval-sequences", "8",
                          "--ood-sequences", "6", "--threads", "1", "--reps", "1", "--out", str(tmp_path / "p.json")])
    (row,) = res["runs"]
    assert (row["linears"], row["already_per_token"]) == (2, 2)
    assert row["kernels"]["static"].get("MatMulInteger") == 2 and row["kernels"]["per_token"].get("MatMulInteger") == 4
    with pytest.raises(SystemExit, match="2 already per token"):
        per_token.main(["--runs", str(run), "--linears", "*.down_proj", "--out", str(tmp_path / "q.json")])

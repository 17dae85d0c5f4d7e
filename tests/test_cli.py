"""The console command: help everywhere, clear config errors, and the quality table end to end."""

import json

from typer.testing import CliRunner

from simulation.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "quality" in result.output
    result = runner.invoke(app, ["quality", "--help"])
    assert result.exit_code == 0 and "--config" in result.output


def test_bad_config_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-llama"\nseq_len = "long"\nbogus = 1\n')
    result = runner.invoke(app, ["quality", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "bad.toml: seq_len" in result.output and "bad.toml: bogus" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["quality", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no model" in result.output


def test_quality_table_on_the_tiny_model(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text('model = "tiny-llama"\nseq_len = 16\neval_sequences = 4\ncalib_sequences = 4\n'
                   'batch_size = 4\nbins = 64\ncalibrators = ["minmax", "mse"]\n')
    result = runner.invoke(app, ["quality", "--config", str(cfg), "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "q" / "quality.json").read_text())
    recipes = [r["recipe"] for r in data["rows"]]
    assert recipes[0] == "float" and "W8A8 mse" in recipes and "W8A16 minmax" in recipes
    assert all(r["ppl"] > 1 and abs(r["increase_pct"]) < 50 for r in data["rows"])
    assert (tmp_path / "q" / "quality.md").read_text().startswith("| recipe |")
    saved = sorted(p.name for p in (tmp_path / "q" / "qparams").iterdir())
    assert "W8A8-mse-real.safetensors" in saved and "W8A16-minmax-real.safetensors" in saved


def test_export_writes_a_device_bundle_that_runs(tmp_path):
    import numpy as np

    from client.runtime import DeviceRuntime
    from quant.instrument import QuantConfig, get_qparams, quantize_
    from quant.qparams import save_qparams
    from simulation.models import tiny_llama

    m = tiny_llama()
    quantize_(m, QuantConfig())  # min-max weights; activations not calibrated: weight points only
    save_qparams(get_qparams(m), tmp_path / "q.safetensors")
    result = runner.invoke(app, ["export", "--model", "tiny-llama", "--qparams", str(tmp_path / "q.safetensors"),
                                 "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "bundle").iterdir()}
    assert {"model.qdq.onnx", "float.onnx", "encodings.json"} <= names
    rt = DeviceRuntime(tmp_path / "bundle" / "model.qdq.onnx")
    logits = rt.logits(np.zeros((1, 8), dtype=np.int64))
    assert logits.shape == (1, 8, 257) and np.all(np.isfinite(logits))


def test_export_refuses_qparams_of_another_model(tmp_path):
    from quant.instrument import QuantConfig, get_qparams, quantize_
    from quant.qparams import save_qparams
    from simulation.models import tiny_llama

    m = tiny_llama(hidden_size=32)
    quantize_(m, QuantConfig())
    save_qparams(get_qparams(m), tmp_path / "q.safetensors")
    result = runner.invoke(app, ["export", "--model", "tiny-llama", "--qparams", str(tmp_path / "q.safetensors"),
                                 "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2 and "for model" in result.output
    assert not (tmp_path / "bundle").exists()

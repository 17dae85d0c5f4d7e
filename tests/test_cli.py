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

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



def test_export_of_per_token_qparams(tmp_path):
    """QParams whose meta names per-token Linears export to ONNX with MatMulInteger for them; the
    LiteRT export, static per-tensor only, refuses them before any work."""
    import numpy as np
    import onnx

    from client.runtime import DeviceRuntime
    from quant.instrument import QuantConfig, get_qparams, quantize_
    from quant.qparams import save_qparams
    from simulation.models import tiny_llama

    m = tiny_llama()
    quantize_(m, QuantConfig(per_token=["*.down_proj"]))
    save_qparams(get_qparams(m), tmp_path / "q.safetensors")
    args = ["export", "--model", "tiny-llama", "--qparams", str(tmp_path / "q.safetensors")]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "t"), "--format", "tflite"])
    assert result.exit_code == 2 and "take their input per token" in result.output
    assert not (tmp_path / "t").exists()
    result = runner.invoke(app, args + ["--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    mp = onnx.load(tmp_path / "bundle" / "model.qdq.onnx")
    assert sum(n.op_type == "MatMulInteger" for n in mp.graph.node) == 2      # tiny-llama: two layers
    logits = DeviceRuntime(tmp_path / "bundle" / "model.qdq.onnx").logits(np.zeros((1, 8), dtype=np.int64))
    assert np.all(np.isfinite(logits))

def test_export_tflite_names_the_missing_extra_and_a_bad_format(tmp_path):
    """Without the fedquant[litert] extra (the default install) --format tflite says how to get
    it; tests/test_litert.py covers the export where the extra is installed."""
    import importlib.util

    import pytest

    from quant.instrument import QuantConfig, get_qparams, quantize_
    from quant.qparams import save_qparams
    from simulation.models import tiny_llama

    m = tiny_llama()
    quantize_(m, QuantConfig())
    save_qparams(get_qparams(m), tmp_path / "q.safetensors")
    args = ["export", "--model", "tiny-llama", "--qparams", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "b")]
    result = runner.invoke(app, args + ["--format", "tflit"])
    assert result.exit_code == 2 and "--format must be onnx or tflite" in result.output
    if importlib.util.find_spec("litert_torch") is not None:
        pytest.skip("the fedquant[litert] extra is installed here: tests/test_litert.py exports for real")
    result = runner.invoke(app, args + ["--format", "tflite"])
    assert result.exit_code == 2 and "pip install -e '.[litert]'" in result.output

# ------------------------------------------------------------------------------ failures a person can read

def _crash_quality(monkeypatch):
    """The quality command's work raises something no command expects."""
    import simulation.quality

    def boom(*args, **kwargs):
        raise RuntimeError("boom: the table broke\nsecond line")
    monkeypatch.setattr(simulation.quality, "run_quality", boom)


def test_an_unexpected_error_is_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDQUANT_DEBUG", raising=False)
    _crash_quality(monkeypatch)
    result = runner.invoke(app, ["quality", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    line = lines[0]
    assert line.startswith("error: fedquant quality failed: RuntimeError: boom: the table broke second line")
    assert "(at simulation/cli.py:" in line and " in quality)" in line     # where
    assert "--debug" in line and "FEDQUANT_DEBUG=1" in line                # what to do


def test_debug_shows_the_traceback_without_locals(tmp_path, monkeypatch):
    _crash_quality(monkeypatch)
    for env, args in (("1", []), (None, ["--debug"])):
        if env is None:
            monkeypatch.delenv("FEDQUANT_DEBUG", raising=False)
        else:
            monkeypatch.setenv("FEDQUANT_DEBUG", env)
        result = runner.invoke(app, [*args, "quality", "--out", str(tmp_path / "o")])
        assert result.exit_code == 1
        out = result.output
        assert "Traceback (most recent call last)" in out and "RuntimeError: boom" in out, out
        assert "in boom" in out and 'raise RuntimeError("boom' in out
        assert "kwargs = " not in out and "─ locals ─" not in out
        assert out.strip().splitlines()[-1].startswith("error: fedquant quality failed: RuntimeError")
        assert "--debug" not in out.strip().splitlines()[-1]


def test_the_command_hides_locals():
    """Locals in a traceback print whole tensors (13,748 lines once)."""
    assert app.pretty_exceptions_show_locals is False


# ------------------------------------------------------------------------------ 80 columns

def test_round_line_fits_80_columns():
    from simulation.cli import _round_line

    m = {"round": 12, "job": "stats", "replies": 7, "sampled": 24, "wall_s": 412.3,
         "rejections": {"client:unavailable": 9, "client:dropout": 3, "count_mismatch": 1, "timeout": 4},
         "server_eval": {"int8": {"perplexity": 118.73}, "mixed": {"perplexity": 130.52},
                         "int8-16": {"perplexity": 118.03}}}
    lines = _round_line(m, 80).splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines), lines
    assert all(line.startswith("    ") for line in lines[1:])
    text = " ".join(lines)
    for part in ("round  12 stats", "7/24 valid", "client:dropout 3", "mixed PPL 130.52", "412.3 s"):
        assert part in text                                  # parts are never cut
    assert _round_line({"round": 1, "job": "scout", "replies": 3, "sampled": 3, "wall_s": 1.0}) == \
        "round   1 scout  3/3 valid  1.0 s"


def test_progress_fits_80_columns(monkeypatch):
    import io

    from rich.console import Console

    import simulation.cli as cli

    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    monkeypatch.setattr(cli, "err", console)
    progress = cli._progress(transient=False)
    progress.add_task("exporting the float ONNX graph of smollm2 (SmolLM2: a few minutes, once)",
                      total=12, completed=3)
    console.print(progress.get_renderable())
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert lines[0].startswith("exporting the float ONNX graph") and "…" in lines[0]
    assert lines[0].rstrip().endswith("3/12 0:00:00")


def test_a_skipped_round_is_said_in_its_line():
    from simulation.cli import _round_line

    line = _round_line({"round": 3, "job": "stats", "replies": 5, "sampled": 6, "wall_s": 2.0,
                        "skipped": "int8: model.layers.0.mlp.down_proj:input scale inf is not finite " * 3})
    assert "SKIPPED: int8: model.layers.0" in line and "…" in line
    assert all(len(x) <= 80 for x in line.splitlines())

"""On the real SmolLM2: static 8-bit activations cost a lot (the outliers), MSE-calibrated ranges
from real text beat the random-token recipe, and W8A16 is near float. Small sizes, so this takes
minutes, not the full table of `fedquant quality`."""

import pytest

from simulation.quality import QualityConfig, run_quality


@pytest.mark.slow
def test_real_text_calibration_beats_random_tokens_on_smollm2(tmp_path):
    cfg = QualityConfig(model="smollm2", seq_len=128, eval_sequences=8, calib_sequences=8,
                        batch_size=4, bins=512, calibrators=["minmax", "mse"])
    result = run_quality(cfg, tmp_path)
    rows = {(r["recipe"], r["calibration_data"].split(" x")[0]): r for r in result["rows"]}
    float_ppl = rows[("float", "-")]["ppl"]
    assert 30 < float_ppl < 300
    for method in ("minmax", "mse"):
        for data in ("real text", "random tokens"):
            assert rows[(f"W8A8 {method}", data)]["increase_pct"] > 5.0  # the outlier problem
    real = rows[("W8A8 mse", "real text")]["ppl"]
    rand = rows[("W8A8 mse", "random tokens")]["ppl"]
    assert real < rand, (real, rand)
    assert rows[("W8A16 minmax", "real text")]["increase_pct"] < 5.0
    assert (tmp_path / "quality.json").is_file()

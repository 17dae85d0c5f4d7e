import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `fedquant simulate` of configs/smoke.toml (tiny random-init models, 4 rounds), shared by
    the benches that read a run directory. Tests must leave it as they found it."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("smoke_run") / "smoke"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", "from simulation.cli import main; main()", "simulate", "--config",
                           str(root / "configs" / "smoke.toml"), "--out", str(out), "--rounds", "4"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out

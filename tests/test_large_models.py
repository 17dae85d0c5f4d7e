"""Models past 2 GB in bounded memory and disk (issue 19, goal 6): the float graph stored once per
run and reused by ``--prepared-from``, the Qwen2.5 configs at their real sizes, the refusal of a
model that cannot fit, a GGUF written here loaded the way a user's would be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simulation.prepare import load_simulation_config, prepare, seed_run_dir

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def _inode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("once") / "run"
    cfg = load_simulation_config(SMOKE)
    return cfg, prepare(cfg, out)


def test_float_graph_and_float_weights_are_stored_once_per_run(prepared):
    cfg, prep = prepared
    out = prep.out
    assert prep.float_onnx == out / "device" / "float.onnx" and prep.float_onnx.is_file()
    assert not (out / "float").exists()        # the export directory was linked in, then removed
    graphs = [p for p in out.rglob("*.onnx*") if p.name.startswith("float.onnx")]
    assert graphs == [prep.float_onnx]
    profiles = sorted(prep.initial)
    weights = {_inode(out / "device" / p / "model.weights.npz") for p in profiles}
    assert len(profiles) == 2 and len(weights) == 1  # one copy of the float weights, linked
    again = prepare(cfg, out)                  # a resumed run reuses the graph, exports nothing
    assert again.float_onnx == prep.float_onnx and _inode(again.float_onnx) == _inode(prep.float_onnx)


def test_prepared_from_links_the_float_graph_and_names_what_is_missing(prepared, tmp_path):
    cfg, prep = prepared
    seeded = tmp_path / "seeded"
    seed_run_dir(cfg, seeded, prep.out)
    assert _inode(seeded / "device" / "float.onnx") == _inode(prep.float_onnx)
    with pytest.raises(ValueError, match="no such run directory"):
        seed_run_dir(cfg, tmp_path / "other", tmp_path / "gone")
    broken = tmp_path / "broken"
    seed_run_dir(cfg, broken, prep.out)
    os.unlink(broken / "device" / "float.onnx")           # the source's own file stays
    with pytest.raises(ValueError, match="the float graph .*float.onnx is missing"):
        seed_run_dir(cfg, tmp_path / "from-broken", broken)
    assert prep.float_onnx.is_file()

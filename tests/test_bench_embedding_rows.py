"""bench/embedding_rows.py on a tiny-model run directory: both tables are evaluated on the run's own
texts, the shared one makes the smaller file, and the run directory is left alone."""

import json

import numpy as np

from bench import embedding_rows


def test_both_tables_on_a_run(smoke_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
    res = embedding_rows.main(["--runs", str(smoke_run), "--threads", "1", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(res))
    assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()} == before
    shared, own = res["rows"]
    assert (shared["embedding"], own["embedding"]) == tuple(embedding_rows.VARIANTS)
    run = json.loads((smoke_run / "run.json").read_text())["config"]["data"]
    for row in (shared, own):
        assert row["heldout"]["sequences"] == run["eval_sequences"]     # the run's own texts
        assert row["ood"]["sequences"] == run["ood_sequences"]
        assert 0 < row["table_relative_error"] < 0.05
        assert row["heldout"]["kl"] >= 0 and 0 < row["heldout"]["top1"] <= 1
    assert shared["file_bytes"] < own["file_bytes"]                   # one copy of the rows, not two
    assert shared["table_relative_error"] != own["table_relative_error"]
    assert np.isfinite(shared["ood"]["vs_float_pct"])

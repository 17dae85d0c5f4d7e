"""bench.compare_runs: the same result with other timings is 'same'; any other number is not."""

from __future__ import annotations

import json
import shutil

from bench.compare_runs import compare, main
from quant.qparams import load_qparams, save_qparams
from tests.test_rounds import make_initial


def run_dir(path, ppl=118.7, wall=10.0):
    (path / "qparams").mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"profiles": {"int8": {"federated_ppl": [ppl]}},
                                                   "wall_s": wall, "machine": {"cpu": str(wall)}}))
    (path / "metrics.jsonl").write_text(json.dumps({"round": 1, "job": "eval", "wall_s": wall}) + "\n")
    (path / "references.json").write_text("{}")
    save_qparams(make_initial()["u8"], path / "qparams" / "u8.safetensors")
    return path


def test_timings_and_metadata_order_do_not_count_but_numbers_do(tmp_path, capsys):
    a, b = run_dir(tmp_path / "a"), run_dir(tmp_path / "b", wall=99.0)
    # the same QParams saved by another process may order the header's metadata otherwise
    qp = load_qparams(b / "qparams" / "u8.safetensors")
    raw = (b / "qparams" / "u8.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (b / "qparams" / "u8.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    assert load_qparams(b / "qparams" / "u8.safetensors").version == qp.version
    assert all(same for _, same, _ in compare(a, b)) and main([str(a), str(b)]) == 0
    c = run_dir(tmp_path / "c", ppl=118.8)
    assert main([str(a), str(c)]) == 1 and "DIFFERENT summary.json" in capsys.readouterr().out
    shutil.rmtree(c)
    d = run_dir(tmp_path / "d")
    save_qparams(make_initial()["u8"].with_points({}, version=7), d / "qparams" / "u8.safetensors")
    assert dict((p, s) for p, s, _ in compare(a, d))["qparams"] is False

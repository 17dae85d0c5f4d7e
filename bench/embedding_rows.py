"""What the tied embedding's rows cost in fidelity: lm_head's (rotated back) or its own.

    .venv/bin/python -m bench.embedding_rows --runs runs/splits/default-imp/seed-0 runs/splits/default-imp/seed-1

A per-token ``lm_head`` stores ``(W * m) R`` (``quant.rotation``); the tied embedding either reads
those integer rows and rotates them back in the graph (``export_qdq(embedding="int8")``, the
default: one copy of the 28 MB table on SmolLM2) or keeps its own int8 rows with min-max scales
(``embedding="int8-own"``). For each run's final int8 QParams both graphs are exported from the
run's device directory (its float graph and float weights, the current code) and evaluated as the
server evaluates (``simulation.evaluation``: perplexity vs float, exact KL(float || quantized),
top-1, bootstrap intervals over sequences) on the run's held-out roles and the out-of-domain text;
beside them, the table's relative error to the float embedding. Writes
``bench/results/embedding_rows.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, command_line, finished_run, machine, quiet_env, shown_run, write_json
from bench.ood_gap import FloatLogits

PROFILE = "int8"
VARIANTS = {"lm_head's rows, rotated back (default)": "int8", "own int8 rows": "int8-own"}


def table_error(table: np.ndarray, linears, qp, share: bool) -> float:
    """Relative Frobenius error of the table the graph computes against the float one."""
    from quant.qdq import embedding_table

    t = embedding_table(table, linears, qp, share=share)
    return float(np.sqrt(((t - table) ** 2).sum() / (table ** 2).sum()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished fedquant simulate run directories")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "embedding_rows.json")
    args = ap.parse_args(argv)
    quiet_env()
    import onnxruntime

    from client.runtime import DeviceRuntime, choose_weight_storage, ort_session
    from quant.onnxfile import load_onnx
    from quant.qdq import export_qdq, set_weight_storage
    from quant.qparams import load_qparams
    from simulation.evaluation import fidelity_columns, fidelity_summary

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    rows = []
    for run in args.runs:
        texts = finished_run(run)            # the run's own evaluation texts
        cfg, sets = texts.cfg, {"heldout": texts.evals, "ood": texts.ood}
        qp = load_qparams(run / "qparams" / f"{PROFILE}.safetensors")
        rt = DeviceRuntime(run / "device" / PROFILE / "model.onnx", threads=args.threads)
        table = np.asarray(rt.linears["lm_head"][0], np.float32)    # tied: the embedding's table
        float_dir = tempfile.TemporaryDirectory()    # each text's float logits, computed once for both variants
        floats = FloatLogits(rt.float_onnx, sets, Path(float_dir.name), args.threads, args.batch_size)
        for what, embedding in VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                export_qdq(rt.linears, qp, path, float_onnx=rt.float_onnx, embedding=embedding)
                mp = load_onnx(path)
                set_weight_storage(mp, choose_weight_storage() == "uint8")
                sess = ort_session(mp, threads=args.threads)
                size = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name.startswith("model.onnx"))
            quant_logits = lambda ids: sess.run(["logits"], {"input_ids": np.asarray(ids, np.int64)})[0]
            row = {"run": shown_run(run), "seed": cfg.data.seed, "embedding": what, "file_bytes": size,
                   "table_relative_error": table_error(table, {"lm_head": (table, None)}, qp, embedding == "int8")}
            for name, ids in sets.items():
                cols = fidelity_columns(quant_logits, ids, args.batch_size, float_logits=floats.reader(name))
                row[name] = fidelity_summary(cols, seed=cfg.data.seed)
            del sess
            rows.append(row)
            h, o = row["heldout"], row["ood"]
            print(f"seed {cfg.data.seed} {what}: held-out {h['vs_float_pct']:+.2f}% KL {h['kl']:.5f}; "
                  f"out of domain {o['vs_float_pct']:+.2f}% KL {o['kl']:.5f}; {size / 1e6:.1f} MB; "
                  f"table error {row['table_relative_error']:.4f}", file=sys.stderr)
        float_dir.cleanup()
    result = {"bench": "embedding_rows", "profile": PROFILE, "machine": machine(onnxruntime=onnxruntime.__version__),
              "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1), "command": command_line("bench.embedding_rows", argv)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""Latency, size and memory of each profile's exported SmolLM2 model against float, on this CPU.

For each profile of a run (its final QParams, ``<run>/qparams/<profile>.safetensors``) this exports
the QDQ model in the form a device runs (and, to show what each change bought, the earlier forms:
int8 weights stored as uint8, the float embedding table), and for each model:

- latency: median of ``--runs`` runs of one ``--batch`` x ``--seq`` batch of real text with
  ``--threads`` intra-op threads, the model and float timed alternately in the same loop (the
  machine is shared: the ratio is what is comparable), one session pair at a time;
- the kernels ORT runs (``optimized_model_filepath``): integer matmuls among all matmuls, and the
  count of every op type;
- file bytes against the quantized payload (integer weights at their bit width, a tied embedding
  counted once, plus the float norms and biases): the issue's bound is 1.1x;
- session memory, in a fresh process per model: RSS held once ORT has loaded the session, the
  peak while loading (ORT parses and transforms the whole model) and after one run;
- the NLL of the batch and perplexity on the run's held-out evaluation sequences
  (``ServerEval``'s set), so that a form's quality cost shows beside its speed;
- the CPU's model name and flags (``lscpu``), which every latency here depends on.

    .venv/bin/python -m bench.latency --run runs/default      # bench/results/latency.json, ~20 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from bench.common import RESULTS, cpu_fields, cpu_model, machine, shown_run, write_json
from client.runtime import choose_weight_storage, ort_session, u8s8_saturates
from quant.qdq import INTEGER_MATMULS, count_matmuls, export_qdq

# name: (profile, export keyword arguments, what the row shows)
VARIANTS = {
    "int8, uint8 storage, float embedding (before)": ("int8", dict(u8_weights=True, embedding="float")),
    "int8, int8 storage, float embedding": ("int8", dict(u8_weights=False, embedding="float")),
    "int8 (shipped: int8 storage, int8 embedding)": ("int8", dict(u8_weights=False, embedding="int8")),
    "int8, int8 storage, the embedding's own int8 rows": ("int8", dict(u8_weights=False, embedding="int8-own")),
    "mixed, float embedding, 4-bit weights dequantized every run (before)": (
        "mixed", dict(u8_weights=True, embedding="float", nbits_barrier=False)),
    "mixed, 4-bit weights as MatMulNBits, float embedding": ("mixed", dict(u8_weights=False, embedding="float")),
    "mixed (shipped: int8 storage, int8 embedding)": ("mixed", dict(u8_weights=False, embedding="int8")),
}

_BITS = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4,
         TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.INT32: 32}


def payload(mp: onnx.ModelProto) -> dict:
    """Bytes of what the model must hold: integer weight tensors at their bit width (``.weight.q``;
    a shared table counted once, being one initializer), the float norms and biases (1-D float
    initializers that are no scale or smoothing factor), and, apart, the float tensors of more
    than 1M elements (a float embedding table or weight) and everything else (scales, zero points,
    smoothing factors, shapes)."""
    out = {"integer_weights": 0, "weight_scales_zero_points": 0, "norms_biases": 0, "large_float": 0, "other": 0}
    for t in mp.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.name.endswith(".weight.q") and t.data_type in _BITS:
            out["integer_weights"] += n * _BITS[t.data_type] // 8
        elif t.name.endswith((".weight.scale", ".weight.zero_point")):
            out["weight_scales_zero_points"] += n * (_BITS.get(t.data_type, 32)) // 8
        elif t.data_type == TensorProto.FLOAT and n > 2**20:
            out["large_float"] += 4 * n
        elif t.data_type == TensorProto.FLOAT and len(t.dims) == 1 and not t.name.endswith(
                (".scale", ".smooth", ".zero_point")) and ("norm" in t.name or t.name.endswith(".bias")):
            out["norms_biases"] += 4 * n
        else:
            out["other"] += len(t.raw_data) or 4 * n
    return out


def op_counts(mp: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in mp.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


MEMORY_PROBE = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[3])
from client.runtime import ort_session
def rss(field="VmRSS:"):  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss()
s = ort_session(sys.argv[1], threads=int(sys.argv[2]))
loaded = rss()
load_peak = rss("VmHWM:")
ids = np.zeros((8, 128), np.int64)
s.run(None, {"input_ids": ids})
print(json.dumps({"rss_before": before, "session_rss": loaded - before, "load_peak_rss": load_peak - before,
                  "after_run_rss": rss() - before,
                  "peak_rss": rss("VmHWM:") - before}))
"""


def memory(model_path: Path, threads: int) -> dict:
    """Session memory of ``model_path`` in a fresh process (bytes over the process before it)."""
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(model_path), str(threads), root],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    from quant.metrics import nll_sum_and_count

    s, c = nll_sum_and_count(logits, ids)
    return s / c


def perplexity(sess, evals: np.ndarray, batch: int = 8) -> float:
    from quant.metrics import nll_sum_and_count

    total, count = 0.0, 0
    for i in range(0, len(evals), batch):
        ids = evals[i:i + batch]
        s, c = nll_sum_and_count(sess.run(["logits"], {"input_ids": ids})[0], ids)
        total, count = total + s, count + c
    return float(np.exp(total / count))


def time_pair(a, b, feed, runs: int) -> tuple[list[float], list[float]]:
    for s in (a, b):
        s.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        for s, t in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - t0)
    return ta, tb


def eval_sequences(config: Path, tokenizer) -> np.ndarray:
    """The held-out sequences ``fedquant simulate`` evaluates on (``Prepared.evals``)."""
    from simulation.fleet import build_fleet
    from simulation.prepare import load_simulation_config

    cfg = load_simulation_config(config)
    profiles = {e.load().name: e for e in cfg.fleet}
    _, evals, _ = build_fleet(cfg.data, tokenizer, [(n, e.share) for n, e in profiles.items()])
    return np.asarray(evals, np.int64)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/default", help="run directory (its qparams/ and device/float.onnx)")
    ap.add_argument("--config", default="configs/default.toml", help="the run's config (its evaluation set)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--work", default=None, help="folder for the exported models (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load_start = loadavg()

    import torch

    from bench.kernels import text_batch
    from quant.qparams import load_qparams
    from simulation.models import load_smollm2

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model, tok = load_smollm2()
    ids = text_batch(tok, args.batch, args.seq, play=1).numpy()
    feed = {"input_ids": ids}
    evals = eval_sequences(Path(args.config), tok)
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    f_onnx = run / "device" / "float.onnx"

    float_sess = ort_session(f_onnx, threads=args.threads, optimized_path=work / "float.opt.onnx")
    float_opt = onnx.load(work / "float.opt.onnx", load_external_data=False)
    float_logits = float_sess.run(["logits"], feed)[0]
    float_row = {"file_bytes": f_onnx.stat().st_size, "kernels": count_matmuls(float_opt),
                 "ops": op_counts(float_opt), "memory": memory(f_onnx, args.threads),
                 "nll_batch": round(nll(float_logits, ids), 4),
                 "eval_perplexity": round(perplexity(float_sess, evals), 3)}
    print(json.dumps({"float": float_row}), flush=True)
    del float_opt

    rows, logits_by = [], {}
    for name, (profile, kw) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        qp = load_qparams(run / "qparams" / f"{profile}.safetensors")
        path = work / f"{len(rows)}.onnx"
        t0 = time.perf_counter()
        export_qdq(model, qp, path, float_onnx=f_onnx, **kw)
        row = {"variant": name, "profile": profile, "export": kw, "export_s": round(time.perf_counter() - t0, 1)}
        mp = onnx.load(path)
        total = sum(n.op_type == "MatMul" for n in mp.graph.node)
        row.update(file_bytes=path.stat().st_size, payload=payload(mp), graph_ops=op_counts(mp))
        del mp
        pay = row["payload"]
        row["file_vs_payload"] = round(row["file_bytes"] / (pay["integer_weights"] + pay["norms_biases"]), 3)
        row["file_vs_payload_with_weight_params"] = round(row["file_bytes"] / (
            pay["integer_weights"] + pay["weight_scales_zero_points"] + pay["norms_biases"]), 3)
        opt = work / "opt.onnx"
        # the graph as stored: the rows name their storage; the CPU rule is recorded beside them
        sess = ort_session(path, threads=args.threads, optimized_path=opt, weight_storage=None)
        om = onnx.load(opt, load_external_data=False)
        counts = count_matmuls(om)
        row.update(kernels=counts, ops=op_counts(om), total_matmuls=total,
                   integer_matmuls=_integer_math(counts), matmulnbits_fp32=counts.get("MatMulNBits", 0))
        del om
        opt.unlink()
        tf, tq = time_pair(float_sess, sess, feed, args.runs)
        logits = sess.run(["logits"], feed)[0]
        logits_by[name] = logits
        row.update(latency_ms=round(statistics.median(tq) * 1e3, 1),
                   float_latency_ms=round(statistics.median(tf) * 1e3, 1),
                   # the median of the per-run ratios: each pair ran back to back, under the same load
                   latency_ratio=round(statistics.median(q / f for q, f in zip(tq, tf)), 3),
                   ratios_per_run=[round(q / f, 3) for q, f in zip(tq, tf)],
                   nll_batch=round(nll(logits, ids), 4),
                   eval_perplexity=round(perplexity(sess, evals), 3))
        del sess
        row["memory"] = memory(path, args.threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
        path.unlink()
    same = {}
    a, b = "int8, uint8 storage, float embedding (before)", "int8, int8 storage, float embedding"
    if a in logits_by and b in logits_by:
        same["int8 uint8 vs int8 storage, logits max diff"] = float(np.abs(logits_by[a] - logits_by[b]).max())

    flags = cpu_fields().get("flags", "").split()
    result = {
        "model": "SmolLM2-135M-Instruct", "run": shown_run(run), "batch": [args.batch, args.seq],
        "threads": args.threads, "runs": args.runs,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": {"model": cpu_model(), "flags": flags, "u8s8_saturates": u8s8_saturates(),
                "weight_storage_auto": choose_weight_storage()},
        "machine": machine(), "eval_sequences": [int(s) for s in evals.shape],
        "float": float_row, "rows": rows, "checks": same,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "loadavg_start_end": [load_start, loadavg()],  # the machine is shared: how busy it was
    }
    write_json(Path(args.out), result)
    print(table(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _integer_math(kernels: dict) -> int:
    """Matmuls in integer arithmetic: MatMulNBits runs at accuracy level 1 here (fp32 compute)."""
    return sum(v for k, v in kernels.items() if k in INTEGER_MATMULS and k != "MatMulNBits")


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def table(result: dict) -> str:
    """The README table (``bench/readme_tables.py`` style): one row per model."""
    f = result["float"]
    lines = ["| model | latency / float (interleaved) | integer-math matmuls / all (+ MatMulNBits, fp32) | Div, Transpose ops run | file | "
             "file / (integer weights + norms, biases) [+ weight scales, zero points] | session memory (held after load; peak) | NLL batch | eval perplexity |",
             "|---|---|---|---|---|---|---|---|---|"]
    fm = f["memory"]
    lines.append(f"| float | 1.00 | 0/{sum(f['kernels'].values())} | "
                 f"{f['ops'].get('Div', 0)}, {f['ops'].get('Transpose', 0)} | {_mb(f['file_bytes'])} | - | "
                 f"{_mb(fm.get('session_rss', 0))}; {_mb(fm.get('peak_rss', 0))} | {f['nll_batch']} | {f['eval_perplexity']} |")
    for r in result["rows"]:
        m = r["memory"]
        lines.append(
            f"| {r['variant']} | {r['latency_ratio']:.2f} ({r['latency_ms']:.0f} ms vs {r['float_latency_ms']:.0f}) | "
            f"{_integer_math(r['kernels'])}/{sum(r['kernels'].values())}"
            f"{' (+' + str(r['kernels']['MatMulNBits']) + ')' if r['kernels'].get('MatMulNBits') else ''} | "
            f"{r['ops'].get('Div', 0)}, {r['ops'].get('Transpose', 0)} | "
            f"{_mb(r['file_bytes'])} | {r['file_vs_payload']:.2f} [{r['file_vs_payload_with_weight_params']:.2f}] | "
            f"{_mb(m.get('session_rss', 0))}; {_mb(m.get('peak_rss', 0))} | {r['nll_batch']} | {r['eval_perplexity']} |")
    c = result["cpu"]
    simd = [x for x in c["flags"] if "avx" in x or "vnni" in x or "amx" in x or x in ("asimddp", "i8mm")]
    lines.append("")
    lines.append(f"CPU: {c['model']} ({' '.join(simd)}); u8 x s8 saturates: {c['u8s8_saturates']}; "
                 f"ONNX Runtime {result['onnxruntime']}; batch {result['batch'][0]} x {result['batch'][1]}, "
                 f"{result['threads']} threads; latency: median of {result['runs']} per-run ratios, each run "
                 f"back to back with float (medians in ms beside it).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

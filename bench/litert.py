"""The LiteRT (TensorFlow Lite) rows of the quality table (issue 18): the fleet's QParams exported
to a ``.tflite`` (``quant.tflite``) beside LiteRT's own calibration, all run in the LiteRT
interpreter on the held-out roles of ``configs/default.toml``.

    .venv-litert/bin/python -m bench.litert --run runs/default      # SmolLM2 (peaks near 19 GB: alone)
    .venv-litert/bin/python -m bench.litert --quick --out /tmp/litert.json           # tiny model

Needs the ``fedquant[litert]`` extra (README, "LiteRT"). Rows, profile int8 (uint8 per-tensor
activations at every Linear input, int8 per-channel weights, MatMul outputs float):

- ``ORT integer``: the fleet's QParams in ONNX Runtime (``client.runtime.DeviceRuntime``, the
  server's evaluation), the reference the LiteRT export must match within 0.5%;
- ``LiteRT float``: the float model converted by ``litert_torch``;
- ``LiteRT fedquant``: the same QParams exported by ``quant.tflite`` (QUANTIZE -> DEQUANTIZE at
  each Linear input with the fleet's scale and zero point, int8 per-channel weights behind a
  DEQUANTIZE, SmoothQuant's Div, the int8 embedding's and int32 bias's values);
- ``LiteRT fedquant, int8 FC kernels`` (``integer=True``): the same points fed to TFLite's int8
  FULLY_CONNECTED, which writes int8: each Linear's output gets a scale of its own, from min-max
  of the float outputs on the pooled training text (a point the fleet does not calibrate);
- ``LiteRT own calibration``: ``ai-edge-quantizer``'s ``static_wi8_ai8`` recipe (every op it
  supports in int8, min-max) calibrated on the float ``.tflite`` with a representative dataset of
  random token ids (the LLM form of ``np.random.rand``, the motivating recipe) and with the pooled
  real training text of every client.

Columns: perplexity, increase over float, file size, median latency of one batch (batch x seq_len
tokens, interleaved with the float ``.tflite`` so machine load hits both alike) and its ratio to
float, on the machine recorded (CPU model + SIMD flags). The QParams come from a finished
``fedquant simulate`` run (``--run``, default ``runs/default``; ``--qparams`` for another file).
Converted models are cached under ``~/.cache/fedquant/bench/litert/<key>/``; ``--fresh`` rebuilds.
Memory: the conversions take about 3.4 GB, but ai-edge-quantizer's calibration keeps every tensor
of every batch and peaked at 18.8 GB on the pooled text (SmolLM2): run it alone on the machine.
Writes ``bench/results/litert.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import cache_dir, machine, quiet_env, shown_path, versions, write_json

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ai-edge-litert", "ai-edge-quantizer", "litert-torch", "litert-converter", "torch",
            "onnxruntime")


def _log(msg: str) -> None:
    print(f"[litert {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _batches(ids: np.ndarray, batch: int) -> list[np.ndarray]:
    """``ids`` cut into full batches of the ``.tflite``'s fixed shape (the last one padded with
    its own first rows, as ``LiteRTRuntime.evaluate`` does)."""
    out = []
    for i in range(0, len(ids), batch):
        b = ids[i:i + batch]
        if len(b) < batch:
            b = np.concatenate([b, np.repeat(b[:1], batch - len(b), axis=0)])
        out.append(b.astype(np.int32))
    return out


def own_calibration(float_tflite: Path, ids: np.ndarray, batch: int, out: Path, fc_only: bool = False) -> dict:
    """LiteRT's own static recipe: ``ai_edge_quantizer`` ``static_wi8_ai8`` (min-max, int8
    per-channel weights, int8 activations of every op it supports) calibrated on ``ids``;
    ``fc_only``: the same on FULLY_CONNECTED only (our points, plus the int8 outputs TFLite's
    kernel needs), everything else float."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from client.litert_runtime import litert_interpreter

    it = litert_interpreter(float_tflite)
    sig = it.get_signature_list()
    key = next(iter(sig))
    name = sig[key]["inputs"][0]
    if fc_only:
        q = quantizer.Quantizer(str(float_tflite))
        q.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.FULLY_CONNECTED,
                            activation_num_bits=8, weight_num_bits=8)
    else:
        q = quantizer.Quantizer(str(float_tflite), recipe.static_wi8_ai8())
    t0 = time.perf_counter()
    calib = q.calibrate({key: [{name: b} for b in _batches(ids, batch)]}, num_threads=2)
    q.quantize(calib, enable_progress_report=False).export_model(str(out), overwrite=True)
    return {"calibration_s": round(time.perf_counter() - t0, 1), "calibration_sequences": int(len(ids))}


def fc_output_ranges(model, qparams, ids: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min-max of every Linear's float output in ``device_module(model, qparams)`` over ``ids``:
    the output scale TFLite's int8 FULLY_CONNECTED needs and the fleet's QParams lack."""
    import torch

    from quant.export import float_linears
    from quant.tflite import device_module

    dev = device_module(model, qparams)
    ranges, hooks = {}, []
    for path in float_linears(model):
        mod = dev.get_submodule(path)
        mod = getattr(mod, "linear", mod)

        def hook(m, args, out, path=path):
            lo, hi = float(out.min()), float(out.max())
            old = ranges.get(path, (lo, hi))
            ranges[path] = (min(old[0], lo), max(old[1], hi))
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(ids), 8):
            dev(input_ids=torch.from_numpy(ids[i:i + 8]), use_cache=False)
    for h in hooks:
        h.remove()
    return ranges


def op_summary(path: Path) -> dict:
    """What the interpreter runs: operators by type, how many write an integer tensor, and the
    output scale/zero point of the ops whose int8 kernels fix them (SOFTMAX, LOGISTIC, TANH: TFLite
    requires 1/256 and -128 for int8 softmax and logistic, 1/128 and 0 for tanh)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ints = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16}
    m = flatbuffer_utils.read_model(str(path))
    g = m.subgraphs[0]
    ops, integer, fixed = {}, 0, {}
    for op in g.operators:
        oc = m.operatorCodes[op.opcodeIndex]
        name = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?")
        ops[name] = ops.get(name, 0) + 1
        out = g.tensors[op.outputs[0]]
        if out.type in ints and name not in ("QUANTIZE",):
            integer += 1
            if name in ("SOFTMAX", "LOGISTIC", "TANH") and out.quantization is not None:
                key = f"{name} {float(out.quantization.scale[0]):.6g}/{int(out.quantization.zeroPoint[0])}"
                fixed[key] = fixed.get(key, 0) + 1
    return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "ops_total": len(g.operators),
            "integer_output_ops": integer, "fixed_output_scales": fixed}


class Timer:
    """Perplexity and interleaved latency of ``.tflite`` models against one float interpreter."""

    def __init__(self, float_tflite: Path, evals: np.ndarray, runs: int, threads: int):
        from client.litert_runtime import LiteRTRuntime

        self.evals, self.runs, self.threads = evals, runs, threads
        self.float = LiteRTRuntime(float_tflite, threads=threads)
        self.feed = _batches(evals, self.float.batch)[0]

    def evaluate(self, path: Path, pair: bool = True, xnnpack: bool = True) -> dict:
        from client.litert_runtime import LiteRTRuntime

        rt = self.float if not pair else LiteRTRuntime(path, threads=self.threads, xnnpack=xnnpack)
        nll, tokens = rt.evaluate(self.evals)          # also the warm-up
        mine, theirs = [], []
        for _ in range(self.runs):
            if pair:
                t0 = time.perf_counter()
                self.float.logits(self.feed)
                theirs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rt.logits(self.feed)
            mine.append(time.perf_counter() - t0)
        theirs = theirs or mine
        lat = statistics.median(mine)
        return {"perplexity": float(np.exp(nll / tokens)), "tokens": int(tokens),
                "latency_ms": round(lat * 1e3, 1),
                "latency_vs_float": round(lat / statistics.median(theirs), 3),
                "file_bytes": Path(path).stat().st_size}


def ort_integer(model, qparams, float_onnx: Path, evals: np.ndarray, work: Path) -> dict:
    """The fleet's QParams in ONNX Runtime, as the server evaluates them (a device bundle and
    ``DeviceRuntime``, which picks the weight storage exact on this CPU)."""
    from client.runtime import DeviceRuntime, save_device_bundle

    path = work / "ort" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_device_bundle(model, qparams, path, float_onnx=float_onnx)
    rt = DeviceRuntime(path, threads=1)
    nll, tokens = rt.evaluate(evals, batch_size=8)
    return {"perplexity": float(np.exp(nll / tokens)), "tokens": int(tokens),
            "weight_storage": rt.weight_storage, "file_bytes": path.stat().st_size}


def quick_qparams(model, ids: np.ndarray):
    """Min-max QParams of the int8 profile from ``ids`` (``--quick`` has no run to read)."""
    import copy

    import torch

    from quant.instrument import get_qparams, quantize_
    from quant.ptq import activation_specs, scout_ranges
    from bench.common import minmax_points

    q = copy.deepcopy(model)
    quantize_(q)
    ranges = scout_ranges(q, [torch.from_numpy(ids[i:i + 8]) for i in range(0, len(ids), 8)])
    weights = get_qparams(q)
    return weights.with_points(minmax_points(ranges, activation_specs(q)))


def _repo_relative(path) -> str:
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else shown_path(p)


def run_relative(path) -> str:
    """A run's file as ``runs/<name>/...`` (where ``fedquant simulate`` writes it in any checkout),
    so that a result names no machine's directory; other paths as ``shown_path`` shows them."""
    parts = Path(path).resolve().parts
    if "runs" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("runs"):])
    return shown_path(path)


def _num(x: float, fmt: str) -> str:
    """``x`` in ``fmt``, or in 2-digit scientific notation when it is too large to read so."""
    return format(x, fmt) if abs(x) < 1e5 else format(x, "+.1e" if fmt.startswith("+") else ".1e")


def markdown_table(result: dict) -> str:
    """The README table of a result (``--table`` prints it from the JSON)."""
    m = result["machine"]
    lines = ["| runtime | recipe | calibration data | perplexity | vs float | vs ORT integer | file | latency / float (interleaved) | ops writing integers / all |",
             "|---|---|---|---|---|---|---|---|---|"]
    ort = result["rows"][0]["perplexity"]
    for r in result["rows"]:
        lat = "-" if r.get("latency_ms") is None else (
            f"{r['latency_vs_float']:.2f} ({r['latency_ms']:.0f} ms)")
        ops = f"{r['integer_output_ops']}/{r['ops_total']}" if "ops_total" in r else "-"
        runtime = r["runtime"] + (" (builtin kernels)" if r.get("kernels") == "builtin" else "")
        lines.append(f"| {runtime} | {r['recipe']} | {r.get('calibration_data', result['qparams'])} | "
                     f"{_num(r['perplexity'], '.3f')} | {_num(r['increase_pct'], '+.2f')}% | "
                     f"{_num(100 * (r['perplexity'] / ort - 1), '+.3f')}% | "
                     f"{'-' if 'file_bytes' not in r else format(r['file_bytes'] / 2**20, '.0f') + ' MiB'} | {lat} | {ops} |")
    flags = " ".join(m.get("simd") or [])
    lines.append("")
    lines.append(f"`{result['command']}` ({result['wall_s']:.0f} s; {result['eval_sequences']} held-out sequences of "
                 f"{result['seq_len']} tokens, batch {result['batch']}, {result['threads']} thread(s), latency the median "
                 f"of {result['latency_runs']} runs each back to back with the float .tflite). CPU: {m.get('cpu_model') or m.get('cpu')} "
                 f"({flags}); " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".")
    return "\n".join(lines)


def torch_fake_quant(model, qparams, evals: np.ndarray) -> dict:
    """The same QParams as torch fake quantization (``quant.instrument``, int8 embedding): a third
    implementation of the same arithmetic, in torch's float ops."""
    import copy

    import torch

    from quant.instrument import QuantConfig, quantize_, set_mode, set_qparams
    from quant.metrics import nll_sum_and_count

    m = copy.deepcopy(model)
    quantize_(m, QuantConfig())
    set_qparams(m, qparams)
    set_mode(m, "quant")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(evals), 4):
            ids = torch.from_numpy(evals[i:i + 4])
            s, c = nll_sum_and_count(m(input_ids=ids, use_cache=False).logits, ids)
            total, count = total + s, count + c
    return {"perplexity": float(np.exp(total / count)), "tokens": int(count)}


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> dict:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="simulation config (default configs/default.toml)")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default", help="fedquant run whose QParams to export")
    ap.add_argument("--qparams", type=Path, default=None, help="QParams file (default <run>/qparams/<profile>.safetensors)")
    ap.add_argument("--profile", default="int8")
    ap.add_argument("--quick", action="store_true", help="configs/smoke.toml's tiny model with min-max QParams from the pooled text")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "litert.json")
    ap.add_argument("--batch", type=int, default=8, help="the .tflite's fixed batch")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed runs per model (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="convert and calibrate again")
    ap.add_argument("--table", action="store_true", help="print the README table of --out and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return {}

    import torch

    from bench.quality import load_data
    from quant.instrument import fingerprint
    from quant.qparams import load_qparams
    from quant.tflite import convert_float, quantize_points, stored_weights

    t_start = time.perf_counter()
    config = args.config or ROOT / "configs" / ("smoke.toml" if args.quick else "default.toml")
    runs = args.latency_runs or (2 if args.quick else 5)
    work = cache_dir() / "litert"
    d = load_data(config, work / "data")
    torch.set_num_threads(2)
    model = d.model
    if args.quick and args.qparams is None:
        qp, qsource = quick_qparams(model, d.train), "min-max on the pooled text (quick)"
    else:
        qpath = args.qparams or args.run / "qparams" / f"{args.profile}.safetensors"
        qp = load_qparams(qpath, expect_model=fingerprint(model))
        qsource = run_relative(qpath)
    qbytes = Path(args.qparams or "").read_bytes() if args.qparams else b""
    key = _key(d.cfg.model, fingerprint(model), sorted(qp.points), qsource, qbytes.hex()[:64], qp.version,
               args.batch, d.cfg.data.seq_len, versions(PACKAGES))
    cache = work / key
    cache.mkdir(parents=True, exist_ok=True)
    seq = d.cfg.data.seq_len
    _log(f"{d.cfg.model}: {len(d.evals)} held-out sequences of {seq}, {len(d.train)} pooled training, "
         f"{len(d.random)} random; cache {shown_path(cache)}")

    def build(name: str, make) -> Path:
        path = cache / name
        if args.fresh or not path.is_file():
            _log(f"building {name}")
            t0 = time.perf_counter()
            make(path)
            _log(f"built {name} in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.1f} MB")
        return path

    float_tfl = build("float.tflite", lambda p: convert_float(model, None, p, batch=args.batch, seq_len=seq))
    dev_float = build("fedquant.float.tflite", lambda p: convert_float(model, qp, p, batch=args.batch, seq_len=seq))
    weights = stored_weights(model, qp)
    fed = build("fedquant.tflite", lambda p: quantize_points(dev_float, weights, qp, p))
    def int8fc(p):
        ranges_file = cache / "fc_output_ranges.json"    # a SmolLM2 forward over the pooled text
        if args.fresh or not ranges_file.is_file():
            write_json(ranges_file, fc_output_ranges(model, qp, d.train))
        ranges = {k: tuple(v) for k, v in json.loads(ranges_file.read_text()).items()}
        quantize_points(dev_float, weights, qp, p, integer=True, output_ranges=ranges)

    fed_int = build("fedquant.int8fc.tflite", int8fc)
    calib_info = {}
    for name, ids, fc_only in (("own.random.tflite", d.random, False), ("own.pooled.tflite", d.train, False),
                               ("own-fc.random.tflite", d.random, True), ("own-fc.pooled.tflite", d.train, True)):
        def make(p, ids=ids, name=name, fc_only=fc_only):
            calib_info[name] = own_calibration(float_tfl, ids, args.batch, p, fc_only)
        build(name, make)

    _log("ONNX Runtime integer model (reference)")
    ort = ort_integer(model, qp, d.float_onnx, d.evals, cache)
    _log("torch fake-quant of the same QParams (quant.instrument)")
    fq = torch_fake_quant(model, qp, d.evals)
    timer = Timer(float_tfl, d.evals, runs, args.threads)
    rows = [dict(recipe="ONNX Runtime integer (fedquant QParams)", runtime="onnxruntime", **ort),
            dict(recipe="torch fake-quant (fedquant QParams)", runtime="torch", **fq)]
    specs = [("LiteRT float", "none", float_tfl, False),
             ("LiteRT fedquant QParams (QDQ form)", qsource, fed, True),
             ("LiteRT fedquant QParams, int8 FC kernels", qsource + " + FC output min-max on pooled text", fed_int, True),
             ("LiteRT own calibration (ai-edge-quantizer static_wi8_ai8)", "random token ids", cache / "own.random.tflite", True),
             ("LiteRT own calibration (ai-edge-quantizer static_wi8_ai8)", "pooled real text", cache / "own.pooled.tflite", True),
             ("LiteRT own calibration, FULLY_CONNECTED only (ai-edge-quantizer)", "random token ids", cache / "own-fc.random.tflite", True),
             ("LiteRT own calibration, FULLY_CONNECTED only (ai-edge-quantizer)", "pooled real text", cache / "own-fc.pooled.tflite", True),
             ("LiteRT fedquant QParams (QDQ form), TFLite builtin kernels (no XNNPACK)", qsource, fed, "builtin")]
    for recipe, data, path, pair in specs:
        _log(f"evaluating {recipe} / {data}")
        kernels = "builtin" if pair == "builtin" else "xnnpack"
        r = dict(recipe=recipe, calibration_data=data, runtime="litert", kernels=kernels, file=path.name,
                 **timer.evaluate(path, bool(pair), xnnpack=kernels == "xnnpack"))
        if path.name in calib_info:
            r.update(calib_info[path.name])
        r.update(op_summary(path))
        rows.append(r)
        _log(f"  PPL {r['perplexity']:.3f}, {r['latency_ms']} ms ({r['latency_vs_float']}x float), "
             f"{r['file_bytes'] / 2**20:.1f} MB")
    float_ppl = next(r["perplexity"] for r in rows if r["recipe"] == "LiteRT float")
    for r in rows:
        r["increase_pct"] = round(100 * (r["perplexity"] / float_ppl - 1), 2)
    ort_ppl = ort["perplexity"]
    result = {
        "format": "fedquant.bench.litert/1",
        "command": " ".join([".venv-litert/bin/python -m bench.litert",
                             *(run_relative(a) if Path(a).exists() else a
                               for a in (sys.argv[1:] if argv is None else argv))]),
        "model": d.cfg.model, "config": _repo_relative(config), "qparams": qsource, "profile": args.profile,
        "eval_sequences": int(len(d.evals)), "seq_len": int(seq), "batch": args.batch,
        "latency_runs": runs, "threads": args.threads,
        "litert_vs_ort_pct": round(100 * (rows[3]["perplexity"] / ort_ppl - 1), 3),
        "litert_builtin_vs_ort_pct": round(100 * (rows[-1]["perplexity"] / ort_ppl - 1), 3),
        "torch_fake_quant_vs_ort_pct": round(100 * (rows[1]["perplexity"] / ort_ppl - 1), 3),
        "litert_int8fc_vs_ort_pct": round(100 * (rows[4]["perplexity"] / ort_ppl - 1), 3),
        "rows": rows, "versions": versions(PACKAGES), "machine": machine(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(args.out, result)
    _log(f"wrote {args.out}: LiteRT fedquant vs ORT integer {result['litert_vs_ort_pct']:+.3f}%")
    return result


if __name__ == "__main__":
    main()

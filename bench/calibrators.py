"""Compare our calibrators with PyTorch's observers and ONNX Runtime's calibrators' math.

Every method only chooses a range ``[lo, hi]``; all ranges go through the same
``range_to_qparams`` and ``fake_quant`` (ONNX semantics), so the SQNR compares the choice of range
and nothing else. Run: ``.venv/bin/python -m bench.calibrators [--source real|synthetic]``.
``real`` (the default) captures SmolLM2's activations on Shakespeare text from the training roles,
as our PTQ sees them: the inputs of the activation points of the instrumented model (weights
fake-quantized at the default W8, activations in float). Writes bench/results/calibrators.json.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, cpu_model, machine, write_json
from quant.affine import fake_quant, range_to_qparams
from quant.calibrate import CalibratorConfig, calibrate
from quant.spec import QuantSpec, activation_spec
from quant.stats import grid_from_absmax, observe

torch.set_num_threads(1)
DEFAULT_OUT = RESULTS / "calibrators.json"
OURS = ("minmax", "percentile", "mse", "entropy")
SPECS = (activation_spec(8), activation_spec(8, signed=True), activation_spec(4), activation_spec(16))
REAL_POINTS = [f"model.layers.{i}.{m}:input" for i in (0, 14, 29) for m in (
    "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")] + ["lm_head:input"]
TIE_DB = 0.01  # methods within this of the best SQNR on a tensor all count as best


def sqnr_db(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    s, z = range_to_qparams(lo, hi, spec)
    x64 = x.astype(np.float64)
    err = np.sum((x64 - fake_quant(x, s, z, spec)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(x64**2) / err))


def _torch_ranges(x: np.ndarray, spec: QuantSpec) -> dict[str, tuple[float, float]]:
    """PyTorch HistogramObserver (its L2 ``_non_linear_param_search``) and MinMaxObserver.

    HistogramObserver searches for ``2 ** bits(dtype)`` levels whatever quant_min/quant_max say
    (256 at 4 bits, 2^32 for qint32), so ``torch_histogram_levels`` also runs it with the spec's
    own level count (``dst_nbins = 2 ** spec.bits``): PyTorch's search at the right precision."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    dtype = {8: torch.qint8 if spec.signed else torch.quint8, 4: torch.qint8 if spec.signed
             else torch.quint8, 16: torch.qint32}[spec.bits]
    qscheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls, levels in (("torch_histogram", HistogramObserver, None),
                                  ("torch_histogram_levels", HistogramObserver, 2**spec.bits),
                                  ("torch_minmax", MinMaxObserver, None)):
            try:
                obs = cls(dtype=dtype, qscheme=qscheme, quant_min=spec.qmin, quant_max=spec.qmax)
                if levels:
                    obs.dst_nbins = levels
                obs(torch.from_numpy(x.reshape(-1)))
                if cls is HistogramObserver:
                    lo, hi = (float(v) for v in obs._non_linear_param_search())
                else:
                    lo, hi = float(obs.min_val), float(obs.max_val)
                out[name] = (lo, hi)
            except Exception as e:                                      # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    return out


def _ort_ranges(x: np.ndarray, spec: QuantSpec,
                entropy_bins: tuple[int, ...] = (128, 2048)) -> dict[str, tuple[float, float]]:
    """ONNX Runtime's calibrators' math on the same tensor, with ORT's defaults per method
    (entropy: 128 bins, 128 quantized bins; percentile: 2048 bins, 99.999; distribution: 2048
    bins, whose int8 range is the histogram's edges, i.e. +-absmax). ORT's default entropy
    (128 bins for 128 quantized bins) has a single candidate, the full range, so it is min-max;
    ``entropy_bins`` adds the 2048-bin variant TensorRT uses (slow: a Python loop, ~3 s/tensor)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    x = x.astype(np.float32).reshape(-1)
    absmax = float(np.abs(x).max())
    out = {"ort_minmax": (-absmax, absmax) if spec.symmetric else (float(x.min()), float(x.max()))}
    todo = [("entropy", b) for b in entropy_bins] + [("percentile", 2048), ("distribution", 2048)]
    for method, bins in todo:
        key = f"ort_{method}" + (f"_{bins}" if method == "entropy" and bins != 128 else "")
        try:
            col = HistogramCollector(method=method, symmetric=spec.symmetric, num_bins=bins,
                                     num_quantized_bins=128, percentile=99.999, scenario="same")
            with contextlib.redirect_stdout(io.StringIO()):
                col.collect({"t": x})
                res = col.compute_collection_result()["t"]
            lo, hi = (res.range_value if hasattr(res, "range_value") else res[:2])
            out[key] = (float(lo), float(hi))
        except Exception as e:                                          # noqa: BLE001
            out[key] = f"{type(e).__name__}: {e}"
    return out


def compare_calibrators(tensors: dict[str, np.ndarray], spec: QuantSpec, bins: int = 2048,
                        config: CalibratorConfig | None = None,
                        ort_entropy_bins: tuple[int, ...] = (128, 2048)) -> list[dict]:
    """One row per (tensor, method): the range chosen and the SQNR (dB) of fake-quant at ``spec``.

    Ours run on ``observe`` statistics over ``grid_from_absmax([max|x|], bins)`` (one client);
    the others see the raw tensor."""
    config = config or CalibratorConfig()
    rows = []
    for name, x in tensors.items():
        x = np.asarray(x, dtype=np.float32)
        stats = observe(x, grid_from_absmax([float(np.abs(x).max())], bins))
        ranges: dict[str, object] = {}
        seconds: dict[str, float] = {}
        for method in OURS:
            t0 = time.perf_counter()
            ranges[method] = calibrate(stats, spec, config.model_copy(update={"method": method}))
            seconds[method] = time.perf_counter() - t0
        for fn in (_torch_ranges, lambda x, spec: _ort_ranges(x, spec, ort_entropy_bins)):
            t0 = time.perf_counter()
            got = fn(x, spec)
            for k in got:                           # the observers' time is shared between them
                seconds[k] = (time.perf_counter() - t0) / len(got)
            ranges.update(got)
        for method, r in ranges.items():
            row = {"tensor": name, "shape": list(x.shape), "spec": spec.short(), "method": method,
                   "seconds": round(seconds[method], 4)}
            if isinstance(r, str):
                row.update(error=r, lo=None, hi=None, sqnr_db=None)
            else:
                row.update(lo=r[0], hi=r[1], sqnr_db=round(sqnr_db(x, *r, spec), 3))
            rows.append(row)
    return rows


def synthetic_activations(seed: int = 0, tokens: int = 1024, channels: int = 576) -> dict[str, np.ndarray]:
    """LLM-like activations: a Gaussian bulk with per-channel scales, plus the outliers LLMs show
    (a few channels 100-1000x larger; a few 'massive' tokens; heavy-tailed MLP inputs; softmax)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 0.3, channels))

    def bulk():
        return rng.standard_normal((tokens, channels)) * scale

    out = {"gaussian": bulk()}
    x = bulk()
    for c, mult in zip(rng.choice(channels, 4, replace=False), (100, 200, 500, 1000)):
        x[:, c] = rng.normal(0.3, 1.0, tokens) * mult               # systematic outlier channels
    out["outlier_channels"] = x
    x = bulk()
    t, c = rng.choice(tokens, 2, replace=False), rng.choice(channels, 3, replace=False)
    x[np.ix_(t, c)] = rng.uniform(300, 1000, (2, 3)) * rng.choice([-1, 1], (2, 3))   # massive tokens
    out["massive_tokens"] = x
    x = rng.standard_t(3, (tokens, channels)) * scale              # heavy-tailed MLP input
    x[:, rng.choice(channels, 2, replace=False)] *= 100
    out["heavy_tail_mlp"] = x
    logits = rng.normal(0, 2, (tokens, 256))
    p = np.exp(logits - logits.max(1, keepdims=True))
    out["softmax"] = p / p.sum(1, keepdims=True)                   # attention probabilities
    return {k: v.astype(np.float32) for k, v in out.items()}


def real_activations(n_seqs: int = 8, seq_len: int = 256, batch: int = 2,
                     keys: list[str] = REAL_POINTS) -> dict[str, np.ndarray]:
    """SmolLM2's inputs at ``keys`` on ``n_seqs`` x ``seq_len`` tokens of training-role speeches
    (shuffled, seed 0): float32 [tokens, channels] per point."""
    from quant.instrument import QuantConfig, capture_inputs, quantize_
    from simulation.models import load_smollm2
    from simulation.sequences import to_sequences
    from simulation.shakespeare import load_roles, split_roles

    train, _ = split_roles(load_roles(), 0.1, 0)
    texts = [s for r in train for s in r.speeches]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    model, tok = load_smollm2()
    ids = to_sequences(texts, tok, seq_len, max_sequences=n_seqs)
    quantize_(model, QuantConfig())
    got: dict[str, list[np.ndarray]] = {k: [] for k in keys}

    def see(key: str, x: torch.Tensor) -> None:
        got[key].append(x.reshape(-1, x.shape[-1]).float().numpy().copy())

    with torch.no_grad(), capture_inputs(model, see, keys):
        for b in ids.split(batch):
            model(input_ids=b)
    del model
    return {k.removeprefix("model.").removesuffix(":input"): np.concatenate(v) for k, v in got.items()}


def summarize(rows: list[dict]) -> dict:
    """Per spec: per tensor and method the SQNR and range; mean SQNR per method over the tensors;
    how often each method is best (ties within TIE_DB all count); best of ours minus best peer."""
    out = {}
    for spec in dict.fromkeys(r["spec"] for r in rows):
        tensors: dict[str, dict] = {}
        for r in (r for r in rows if r["spec"] == spec):
            t = tensors.setdefault(r["tensor"], {"shape": r["shape"], "methods": {}})
            t["methods"][r["method"]] = ({"error": r["error"]} if "error" in r else
                                         {k: r[k] for k in ("sqnr_db", "lo", "hi", "seconds")})
        methods = list(dict.fromkeys(m for t in tensors.values() for m in t["methods"]))
        best = dict.fromkeys(methods, 0)
        margin = {}
        for name, t in tensors.items():
            db = {m: v["sqnr_db"] for m, v in t["methods"].items() if v.get("sqnr_db") is not None}
            for m in db:
                best[m] += db[m] >= max(db.values()) - TIE_DB
            margin[name] = round(max(db[m] for m in OURS if m in db)
                                 - max(v for m, v in db.items() if m not in OURS), 3)
        sq = {m: [t["methods"].get(m, {}).get("sqnr_db") for t in tensors.values()] for m in methods}
        mean = {m: round(float(np.mean(v)), 3) for m, v in sq.items() if None not in v}
        out[spec] = {"tensors": tensors, "summary": {
            "mean_sqnr_db": mean, "best_count": best, "n_tensors": len(tensors),
            "ours_minus_best_peer_db": margin}}
    return out


def print_tables(result: dict) -> None:
    for spec, res in result["specs"].items():
        tensors, summ = res["tensors"], res["summary"]
        methods = list(summ["best_count"])
        print(f"\n### SQNR (dB) of fake-quant, {spec}\n")
        print("| tensor | " + " | ".join(methods) + " | ours - best peer |")
        print("|---" * (len(methods) + 2) + "|")
        for name, t in tensors.items():
            db = [t["methods"][m].get("sqnr_db") for m in methods]
            top = max(v for v in db if v is not None)
            cells = ["n/a" if v is None else f"**{v:.2f}**" if v >= top - TIE_DB else f"{v:.2f}"
                     for v in db]
            print(f"| {name} | " + " | ".join(cells) + f" | {summ['ours_minus_best_peer_db'][name]:+.2f} |")
        print("| **mean** | " + " | ".join(
            f"{summ['mean_sqnr_db'][m]:.2f}" if m in summ["mean_sqnr_db"] else "n/a" for m in methods) + " | |")
        print(f"| **best (of {summ['n_tensors']})** | "
              + " | ".join(str(summ["best_count"][m]) for m in methods) + " | |")


def _machine() -> dict:
    """bench.common.machine, "cpu" being the model name (the README's calibrators block shows it)."""
    import onnxruntime

    return machine(cpu=cpu_model(), onnxruntime=onnxruntime.__version__, numpy=np.__version__)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=("real", "synthetic"), default="real")
    ap.add_argument("--bins", type=int, default=2048, help="histogram bins of our statistics")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tensors = real_activations() if args.source == "real" else synthetic_activations()
    t_source = time.perf_counter() - t0
    rows = []
    for spec in SPECS:
        rows += compare_calibrators(tensors, spec, args.bins)
        print(f"{spec.short()}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    data = ("SmolLM2-135M-Instruct (default QuantConfig: W8 weights fake-quantized), inputs of "
            "the activation points on 8 x 256 tokens of training-role speeches (split_roles 0.1, "
            "seed 0; shuffled, seed 0)" if args.source == "real" else "synthetic_activations(seed=0)")
    result = {"source": args.source, "data": data, "bins": args.bins, "tie_db": TIE_DB,
              "machine": _machine(), "source_seconds": round(t_source, 1),
              "wall_seconds": round(time.perf_counter() - t0, 1), "specs": summarize(rows)}
    write_json(args.out, result)
    print_tables(result)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()

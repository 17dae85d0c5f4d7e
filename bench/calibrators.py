"""Compare our calibrators with PyTorch's observers and ONNX Runtime's calibrators' math.

Every method only chooses a range ``[lo, hi]``; all ranges go through the same
``range_to_qparams`` and ``fake_quant`` (ONNX semantics), so the SQNR compares the choice of range
and nothing else. Run: ``.venv/bin/python bench/calibrators.py`` (synthetic activations) or call
``main(source=...)`` with a function returning ``{name: array}`` of real activations.
Not part of the test suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quant.affine import fake_quant, range_to_qparams
from quant.calibrate import CalibratorConfig, calibrate
from quant.spec import QuantSpec, activation_spec
from quant.stats import grid_from_absmax, observe

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parent / "results" / "calibrators.json"
OURS = ("minmax", "percentile", "mse", "entropy")


def sqnr_db(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    s, z = range_to_qparams(lo, hi, spec)
    x64 = x.astype(np.float64)
    err = np.sum((x64 - fake_quant(x, s, z, spec)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(x64**2) / err))


def _torch_ranges(x: np.ndarray, spec: QuantSpec) -> dict[str, tuple[float, float]]:
    """PyTorch HistogramObserver (its L2 ``_non_linear_param_search``) and MinMaxObserver."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    dtype = {8: torch.qint8 if spec.signed else torch.quint8, 4: torch.qint8 if spec.signed
             else torch.quint8, 16: torch.qint32}[spec.bits]
    qscheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in (("torch_histogram", HistogramObserver), ("torch_minmax", MinMaxObserver)):
            try:
                obs = cls(dtype=dtype, qscheme=qscheme, quant_min=spec.qmin, quant_max=spec.qmax)
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


def print_table(rows: list[dict]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for spec in dict.fromkeys(r["spec"] for r in rows):
        print(f"\nSQNR (dB) of fake-quant, {spec}")
        print(f"{'tensor':<18}" + "".join(f"{m:>{max(len(m) + 1, 8)}}" for m in methods))
        for tensor in dict.fromkeys(r["tensor"] for r in rows):
            cells = {r["method"]: r["sqnr_db"] for r in rows if r["spec"] == spec and r["tensor"] == tensor}
            print(f"{tensor:<18}" + "".join(
                f"{'n/a' if cells.get(m) is None else f'{cells[m]:.2f}':>{max(len(m) + 1, 8)}}"
                for m in methods))


def main(source: Callable[[], dict[str, np.ndarray]] = synthetic_activations,
         specs: tuple[QuantSpec, ...] = (activation_spec(8), QuantSpec(bits=8, symmetric=True),
                                         activation_spec(4), activation_spec(16)),
         out: Path = RESULTS, bins: int = 2048) -> list[dict]:
    tensors = source()
    rows = [row for spec in specs for row in compare_calibrators(tensors, spec, bins)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()

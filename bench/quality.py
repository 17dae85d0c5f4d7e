"""The quality benchmark of issue 5: every recipe evaluated in the same ONNX Runtime integer runtime
on the same held-out roles as ``fedquant simulate --config configs/default.toml``.

    .venv/bin/python -m bench.quality                        # peer rows on SmolLM2 (~20 min, cached)
    .venv/bin/python -m bench.quality --runs runs/default=fedquant runs/smooth="fedquant + smoothing"
    .venv/bin/python -m bench.quality --quick --out /tmp/q   # the smoke config's tiny model (seconds)

Rows (profile int8: uint8 per-tensor asymmetric activations at every Linear input, int8 per-channel
symmetric weights, MatMul outputs float):

- ``float``: the float ONNX graph;
- the peer tool, ONNX Runtime ``quantize_static`` (QDQ, per-channel weights, uint8 activations,
  ``OpTypesToExcludeOutputQuantization=[MatMul]``, only the Linear MatMuls): MinMax and Percentile
  fed random token ids (the common ``representative_dataset`` recipe), MinMax, Percentile
  (ORT's defaults: 99.999, 2048 bins, symmetric |x| histogram) and Entropy (ORT's defaults: 128
  bins, 128 quantized bins) on the pooled training data of every client. Calibration runs one
  batch at a time (``CalibStridedMinMax``, which strides every calibrator, not only MinMax): the
  Percentile/Entropy calibrators otherwise keep every intermediate output of every batch in memory.
  ORT's int8 weights are stored on the uint8 grid afterwards (``q + 128``, same real values,
  ``--ort-weights u8``): this CPU's u8s8 kernels (AVX2 without VNNI) saturate int16 pair sums, the
  u8u8 ones are exact, and our own export stores weights the same way (quant.qdq.export_qdq);
- the other peer, PyTorch's ``HistogramObserver`` (quint8, per_tensor_affine) on every activation
  point over the pooled data, its (scale, zero_point) as our QParams (weights min-max per channel,
  as the profile does), exported by our QDQ exporter;
- fedquant rows from ``fedquant simulate`` run directories (``--runs``): per profile the last
  federated perplexity, rounds and bytes per client from ``summary.json``, and the run's final
  QDQ model (``export/<profile>/model.onnx``) evaluated here for latency and kernels.

Columns: perplexity on the held-out roles, increase over float with its bootstrap 95% interval,
KL(float || quantized) per token and top-1 agreement with the float model (measured in lockstep
with the float session), the same change and KL on the out-of-domain text (``data.ood_sequences``
of the CIA World Factbook), integer MatMul kernels / all
matmul-like nodes in the graph ORT runs (``SessionOptions.optimized_model_filepath``), median latency
of one batch (8 x seq_len, 1 thread, interleaved with the float model so that machine load hits both
alike), the mixed-precision budget a fedquant profile spends (numel-weighted average weight bits;
activation points at 16 bits / all), rounds, bytes per client. The peer models are cached
(calibration is the slow part) under ``~/.cache/fedquant/bench/quality/<digest>/``, keyed by the
config, the data, the float graph and the library versions; every model is re-evaluated on each run. ``--fresh`` recalibrates.
Writes ``bench/results/quality_bench.json`` and ``quality_bench.png`` (``--out`` for elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import RESULTS, ROOT, cache_dir, cpu_model, machine, shown_path, write_json
from quant.qdq import INTEGER_MATMULS

FORMAT = "fedquant.bench.quality/1"
RECIPES_VERSION = "2"        # bump when a recipe changes: cached models are then recomputed
PROFILE = "int8"


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cache_root() -> Path:
    return cache_dir() / "quality"


# ------------------------------------------------------------------------------------ data

@dataclass
class Data:
    cfg: object
    config_path: Path
    model: object
    float_onnx: Path
    train: np.ndarray        # pooled training ids of every client, int64 [N, T]
    evals: np.ndarray        # held-out roles, int64 [E, T]
    random: np.ndarray       # the random-token recipe's ids, int64 [R, T]
    about: dict
    ood: np.ndarray | None = None   # the out-of-domain text's ids (simulation.fleet.ood_sequences)


def load_data(config_path: Path, work: Path) -> Data:
    """Model, clients and held-out ids exactly as ``simulation.prepare.prepare`` builds them."""
    import torch

    from simulation.fleet import build_fleet, ood_sequences
    from simulation.models import load_model
    from simulation.sequences import random_token_sequences
    from simulation.prepare import float_onnx_graph, load_simulation_config

    cfg = load_simulation_config(config_path)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model)
    model.eval()
    profiles = {e.load().name: (e.load(), e) for e in cfg.fleet}
    clients, evals, about = build_fleet(cfg.data, tokenizer, [(n, e.share) for n, (_, e) in profiles.items()])
    ood, ood_ids = ood_sequences(cfg.data, tokenizer)
    about = {**about, "ood_sequences": int(len(ood)), "ood_ids": ood_ids}
    float_onnx = float_onnx_graph(model, cfg, work, _log)
    train = np.concatenate([c.train for c in clients]).astype(np.int64)
    rnd = random_token_sequences(model.config.vocab_size, cfg.data.random_sequences, cfg.data.seq_len,
                                 cfg.data.seed).numpy().astype(np.int64)
    return Data(cfg, Path(config_path), model, float_onnx, train, np.asarray(evals, np.int64), rnd, about,
                np.asarray(ood, np.int64))


def peer_config_key(cfg) -> str:
    """The parts of a simulation config the peer rows depend on: model, data and the fleet's
    profiles and shares (which client holds which data). Not a fleet entry's overrides, nor the
    server's schedule or aggregation: only the fedquant rows use those."""
    d = cfg.model_dump(mode="json")
    fleet = [[e["profile"], e["share"]] for e in d["fleet"]]
    return json.dumps({"model": d["model"], "data": d["data"], "fleet": fleet}, sort_keys=True)


def data_digest(d: Data, settings: dict) -> str:
    """What the cached peer models depend on: the config, the ids, the float graph and versions."""
    import onnxruntime
    import torch

    h = hashlib.sha256()
    for part in (peer_config_key(d.cfg), RECIPES_VERSION, onnxruntime.__version__, torch.__version__,
                 str(d.float_onnx.resolve()), str(d.float_onnx.stat().st_size),
                 json.dumps(settings, sort_keys=True)):
        h.update(part.encode() + b"|")
    for a in (d.train, d.evals, d.random):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- evaluation

def count_kernels(optimized_path: Path) -> dict[str, int]:
    import onnx

    from quant.qdq import count_matmuls

    return count_matmuls(onnx.load(str(optimized_path), load_external_data=False))


def integer_kernels(counts: dict[str, int]) -> int:
    """Matmuls computed in integer math. MatMulNBits is left out: client.runtime.ort_session runs
    it at accuracy level 1, which dequantizes its weights and multiplies in fp32 (bench/kernels.py)."""
    return sum(v for k, v in counts.items() if k in INTEGER_MATMULS and k != "MatMulNBits")


def integer_share(counts: dict[str, int]) -> float:
    """Integer matmul kernels over every matmul-like node ORT runs (attention matmuls included)."""
    total = sum(counts.values())
    return round(integer_kernels(counts) / total, 4) if total else 0.0


FIDELITY_KEYS = ("vs_float_pct", "vs_float_pct_ci", "kl", "kl_ci", "top1", "top1_ci")


def fidelity_fields(res: dict | None) -> dict:
    """A row's fidelity columns from an evaluation (``simulation.evaluation.fidelity_summary``,
    the out-of-domain text's under ``ood``); none for an evaluation without them (older runs)."""
    if not res or "kl" not in res:
        return {}
    out = {k: res[k] for k in FIDELITY_KEYS}
    if res.get("ood"):
        out["ood"] = {k: res["ood"][k] for k in ("perplexity", "float_perplexity", "sequences", *FIDELITY_KEYS)}
    return out


class Evaluator:
    """Perplexity, fidelity to float, kernels and latency of ONNX models on the held-out ids (and
    the out-of-domain ids), against one float session kept for the whole run (fidelity runs the
    two in lockstep; latency pairs interleave them)."""

    def __init__(self, float_onnx: Path, evals: np.ndarray, work: Path, runs: int, batch: int = 8,
                 ood: np.ndarray | None = None):
        self.evals, self.work, self.runs, self.batch, self.ood = evals, work, runs, batch, ood
        self.float_times: list[float] = []
        self.float_session = None
        self.float = self.evaluate(float_onnx, pair=False)
        self.float_ppl = self.float["perplexity"]

    def _session(self, path: Path, opt: Path | None):
        from client.runtime import ort_session

        return ort_session(path, threads=1, optimized_path=opt)

    def perplexity(self, sess, evals: np.ndarray | None = None) -> float:
        from quant.metrics import nll_sum_and_count

        evals = self.evals if evals is None else evals
        total, count = 0.0, 0
        for i in range(0, len(evals), self.batch):
            ids = evals[i:i + self.batch]
            s, c = nll_sum_and_count(sess.run(["logits"], {"input_ids": ids})[0], ids)
            total, count = total + s, count + c
        return float(np.exp(total / count))

    def fidelity(self, sess) -> dict:
        """``simulation.evaluation.fidelity_summary`` of ``sess`` against the float session on the
        held-out ids, the out-of-domain ids under ``ood``."""
        from simulation.evaluation import fidelity_columns, fidelity_summary

        def run(model):
            return lambda ids: model.run(["logits"], {"input_ids": ids})[0]
        res = fidelity_summary(fidelity_columns(run(sess), self.evals, self.batch, float_logits=run(self.float_session)))
        if self.ood is not None and len(self.ood):
            res["ood"] = fidelity_summary(fidelity_columns(run(sess), self.ood, self.batch,
                                                           float_logits=run(self.float_session)))
        return res

    def evaluate(self, path: Path, pair: bool = True) -> dict:
        opt = self.work / "optimized.onnx"
        sess = self._session(path, opt)
        counts = count_kernels(opt)
        opt.unlink(missing_ok=True)
        fid: dict = {}
        if self.float_session is None:                 # the float model itself
            ppl = self.perplexity(sess)                 # also the warm-up
            if self.ood is not None and len(self.ood):
                fid["ood_perplexity"] = self.perplexity(sess, self.ood)
        else:
            fid = self.fidelity(sess)
            ppl = fid["perplexity"]
        feed = {"input_ids": self.evals[:self.batch]}
        mine, theirs = [], []
        for _ in range(self.runs):
            if pair and self.float_session is not None:
                t0 = time.perf_counter()
                self.float_session.run(["logits"], feed)
                theirs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sess.run(["logits"], feed)
            mine.append(time.perf_counter() - t0)
        if self.float_session is None:
            self.float_session = sess
            theirs = mine
        self.float_times += theirs
        lat = statistics.median(mine)
        return {"perplexity": ppl, **fidelity_fields(fid),
                **({"ood_perplexity": fid["ood_perplexity"]} if "ood_perplexity" in fid else {}),
                "kernels": counts, "integer_share": integer_share(counts),
                "latency_ms": round(lat * 1e3, 1),
                "latency_vs_float": round(lat / statistics.median(theirs), 3) if theirs else None}


# ---------------------------------------------------------------------------------- recipes

def linear_matmul_nodes(float_onnx: Path) -> list[str]:
    """Names of the MatMul nodes of nn.Linear layers (quant.export tags them); the attention
    matmuls are left float, as the int8 profile leaves them."""
    import onnx

    from quant.export import LINEAR_TAG, node_tag

    mp = onnx.load(str(float_onnx), load_external_data=False)
    return [n.name for n in mp.graph.node if n.op_type == "MatMul" and node_tag(n, LINEAR_TAG) is not None]


class _Reader:
    """A CalibrationDataReader over ``ids`` in batches, with the ``__len__``/``set_range`` that
    quantize_static's strided calibration (``CalibStridedMinMax``) asks for."""

    def __init__(self, ids: np.ndarray, batch: int):
        self.batches = [ids[i:i + batch] for i in range(0, len(ids), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self.pos >= self.end:
            return None
        self.pos += 1
        return {"input_ids": self.batches[self.pos - 1]}


def ort_static(float_onnx: Path, ids: np.ndarray, method: str, out: Path, batch: int,
               weights: str = "u8") -> dict:
    """ONNX Runtime's quantize_static on ``ids``; returns the settings used."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    CalibrationDataReader.register(_Reader)
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    extra = {"OpTypesToExcludeOutputQuantization": ["MatMul"], "ActivationSymmetric": False,
             "WeightSymmetric": True, "CalibStridedMinMax": 1}
    reduce_range = weights == "s8-reduce-range"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)             # "consider pre-processing": we quantize the graph as exported
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_static(str(float_onnx), str(out), _Reader(ids, batch), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], nodes_to_quantize=linear_matmul_nodes(float_onnx),
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=cm, extra_options=extra)
    finally:
        root.setLevel(level)
    shifted = 0
    if weights == "u8":
        shifted = u8_weights(out)
    return {"tool": "onnxruntime.quantization.quantize_static", "calibrate_method": method,
            "quant_format": "QDQ", "per_channel": True, "reduce_range": reduce_range,
            "activation_type": "QUInt8", "weight_type": "QInt8", "weights_stored": weights,
            "weights_shifted_to_u8": shifted, "nodes": "Linear MatMuls", "calibration_batch": batch,
            "extra_options": extra, "calibration_sequences": int(len(ids)),
            "percentile": 99.999 if method == "percentile" else None}


def u8_weights(path: Path) -> int:
    """Store every int8 weight behind a DequantizeLinear on the uint8 grid (q + 128, z + 128): the
    same real values, computed by ORT's exact u8u8 kernels instead of the u8s8 ones that saturate
    on x86 without VNNI. Returns how many weights were moved."""
    import onnx
    from onnx import TensorProto, numpy_helper

    mp = onnx.load(str(path))
    inits = {t.name: t for t in mp.graph.initializer}
    done: set[str] = set()
    moved = 0
    for n in mp.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3:
            continue
        w, z = inits.get(n.input[0]), inits.get(n.input[2])
        if w is None or z is None or w.data_type != TensorProto.INT8:
            continue
        for t in (w, z):
            if t.name in done:
                continue
            a = numpy_helper.to_array(t).astype(np.int16) + 128
            t.CopyFrom(numpy_helper.from_array(a.astype(np.uint8), t.name))
            done.add(t.name)
        moved += 1
    onnx.save(mp, str(path))
    return moved


def torch_histogram(d: Data, out: Path, batch: int) -> dict:
    """PyTorch's HistogramObserver at every activation point of the int8 profile over the pooled
    training data; weights min-max per channel; exported with our QDQ exporter."""
    import copy

    import torch
    from torch.ao.quantization.observer import HistogramObserver

    from quant.instrument import capture_inputs, get_qparams, quantize_, set_mode
    from quant.ptq import activation_specs
    from quant.qdq import export_qdq
    from quant.qparams import PointParams
    from simulation.config import quant_config_for

    entry = next(e for e in d.cfg.fleet if e.load().name == PROFILE)
    qcfg = quant_config_for(entry.load(), entry)
    m = copy.deepcopy(d.model)
    quantize_(m, qcfg)
    set_mode(m, "float")                     # observe the float model's activations, as ORT does
    observers: dict = {}
    alias: dict[str, str] = {}
    last: list = [None, None]                # (tensor, key): q/k/v and gate/up share their input

    def see(key: str, x: torch.Tensor) -> None:
        if last[0] is x:
            alias[key] = last[1]
            return
        last[0], last[1] = x, key
        obs = observers.setdefault(key, HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine))
        obs(x.detach().float())

    with warnings.catch_warnings(), torch.no_grad(), capture_inputs(m, see):
        warnings.simplefilter("ignore")
        for i in range(0, len(d.train), batch):
            m(input_ids=torch.from_numpy(d.train[i:i + batch]))
    qp = get_qparams(m)                      # the weights' min-max points (activations have none yet)
    points = {}
    for key, spec in activation_specs(m).items():
        obs = observers[alias.get(key, key)]
        s, z = obs.calculate_qparams()
        points[key] = PointParams(spec, np.float32(s.item()), np.int64(z.item()))
    if not points:
        raise RuntimeError("HistogramObserver: the int8 profile has no activation points")
    qp = qp.with_points(points)
    del m
    export_qdq(d.model, qp, out, float_onnx=d.float_onnx)
    return {"tool": "torch.ao.quantization.HistogramObserver", "dtype": "quint8",
            "qscheme": "per_tensor_affine", "weights": "min-max per channel (profile int8)",
            "export": "quant.qdq.export_qdq (u8 weights)", "points": len(points),
            "observed_tensors": len(observers), "calibration_sequences": int(len(d.train)),
            "batch": batch, "torch": torch.__version__}


PEERS = [
    # (recipe, label, data, method)
    ("ort-random-minmax", "random ids, ORT MinMax", "random", "minmax"),
    ("ort-random-percentile", "random ids, ORT Percentile 99.999", "random", "percentile"),
    ("ort-minmax", "pooled data, ORT MinMax", "train", "minmax"),
    ("ort-percentile", "pooled data, ORT Percentile 99.999", "train", "percentile"),
    ("ort-entropy", "pooled data, ORT Entropy", "train", "entropy"),
    ("torch-histogram", "pooled data, PyTorch HistogramObserver", "train", "histogram"),
]


def peer_model(d: Data, recipe: str, data: str, method: str, cache: Path, fresh: bool,
               batch: int, weights: str) -> tuple[Path, dict]:
    """The quantized model of one peer recipe, from the cache unless ``fresh``."""
    path, meta_f = cache / f"{recipe}.onnx", cache / f"{recipe}.json"
    if not fresh and path.is_file() and meta_f.is_file():
        return path, {**json.loads(meta_f.read_text()), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{recipe}.tmp{os.getpid()}.onnx"
    t0 = time.perf_counter()
    ids = d.random if data == "random" else d.train
    if method == "histogram":
        settings = torch_histogram(d, tmp, batch)
        shutil.move(str(tmp.with_suffix(".names.json")), str(path.with_suffix(".names.json")))
    else:
        settings = ort_static(d.float_onnx, ids, method, tmp, batch, weights)
    meta = {**settings, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}
    os.replace(tmp, path)
    write_json(meta_f, meta)
    return path, {**meta, "cached": False}


# --------------------------------------------------------------------------------- fedquant

def reference_rows(run_dir: Path, label: str) -> list[dict]:
    """The run's own reference rows per profile (summary.json): the random-token recipe with the
    run's calibrator (its starting point) and the same recipe centralized on the pooled data."""
    f = run_dir / "summary.json"
    if not f.is_file():
        return []
    rows = []
    for p, ps in json.loads(f.read_text())["profiles"].items():
        for key, what, leaves in (("random_calib_ppl", "random ids, same calibrator", False),
                                  ("centralized_ppl", "centralized, same recipe on pooled data", True)):
            if ps.get(key):
                rows.append({"label": f"{label}: {what} ({p})", "recipe": f"{run_dir.name}:{key}",
                             "source": "reference", "profile": p, "perplexity": ps[key],
                             **fidelity_fields(ps.get(key.removesuffix("_ppl"))),
                             "float_ppl_run": ps.get("float_ppl"), "integer_share": None, "kernels": None,
                             "latency_ms": None, "latency_vs_float": None, "rounds": None,
                             "bytes_per_client": None, "seconds": None, "raw_data_leaves_clients": leaves})
    return rows


def profile_budget(run_dir: Path, profile: str) -> dict:
    """What a profile spends of issue 5's mixed-precision budget (at most 10% of activation points
    at 16 bits, at most 6 average weight bits): from the run's starting QParams and the device's
    float weights. Empty when the run directory lacks them."""
    from client.runtime import load_float_linears, weights_path
    from quant.mixed import average_weight_bits
    from quant.qparams import load_qparams

    qf, wf = run_dir / "initial" / f"{profile}.safetensors", weights_path(run_dir / "device" / profile / "model.onnx")
    if not (qf.is_file() and wf.is_file()):
        return {}
    qp = load_qparams(qf)
    numel = {f"{p}:weight": int(w.size) for p, (w, _) in load_float_linears(wf).items()}
    weights = {k: p.spec for k, p in qp.points.items() if k.endswith(":weight")}
    acts = [p.spec for k, p in qp.points.items() if not k.endswith(":weight")]
    return {"avg_weight_bits": round(average_weight_bits(weights, numel), 3) if weights else None,
            "act16_points": sum(s.bits == 16 for s in acts), "act_points": len(acts)}


def fedquant_rows(run_dir: Path, label: str, ev: Evaluator, d: Data) -> list[dict]:
    """One row per profile of a ``fedquant simulate`` run directory (none, with a warning, when
    it has no summary.json or was run on another model / held-out set)."""
    f = run_dir / "summary.json"
    if not f.is_file():
        _log(f"warning: {f} missing, run skipped")
        return []
    s = json.loads(f.read_text())
    if s.get("model") != d.cfg.model or s.get("data", {}).get("eval_sequences") != len(d.evals):
        _log(f"warning: {run_dir} ran {s.get('model')} on {s.get('data', {}).get('eval_sequences')} "
             f"held-out sequences, this benchmark {d.cfg.model} on {len(d.evals)}: skipped")
        return []
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    rows = []
    for p, ps in s["profiles"].items():
        budget = profile_budget(run_dir, p)
        evals = [m for m in lines if (m.get("server_eval") or {}).get(p) is not None]
        if not evals:
            _log(f"warning: {run_dir}: profile {p} has no federated evaluation, skipped")
            continue
        model = run_dir / "export" / p / "model.onnx"
        final = None
        if model.is_file():
            final = ev.evaluate(model)
        else:
            _log(f"warning: {model} missing: no latency or kernels for {label} ({p})")
        for m in evals:     # a row per server-side evaluation: after the statistics, after learning
            r = m["round"]
            done = [x for x in lines if x["round"] <= r]
            jobs = [x["job"] for x in done if x["job"] != "eval"]
            up = sum(((x.get("bytes") or {}).get(p) or {}).get("up_per_client") or 0 for x in done)
            down = sum(((x.get("bytes") or {}).get(p) or {}).get("down_per_client") or 0 for x in done)
            ppl = m["server_eval"][p]
            ppl = ppl["perplexity"] if isinstance(ppl, dict) else ppl
            what = "+".join(f"{j}x{jobs.count(j)}" if jobs.count(j) > 1 else j for j in dict.fromkeys(jobs))
            row = {"label": f"{label}, {what} ({p})", "recipe": f"fedquant:{run_dir.name}@{r}", "source": "fedquant",
                   "profile": p, "perplexity": ppl, "float_ppl_run": ps.get("float_ppl"),
                   **fidelity_fields(m["server_eval"][p] if isinstance(m["server_eval"][p], dict) else None),
                   "rounds": len(jobs), "bytes_per_client": int(up + down), "bytes_up_per_client": int(up),
                   "bytes_down_per_client": int(down), "clients": ps.get("clients"), "seconds": s.get("wall_s"),
                   "run_dir": str(run_dir), "raw_data_leaves_clients": False, **budget}
            if final is not None:   # one graph per profile: every round's model has the same nodes
                row.update(integer_share=final["integer_share"], kernels=final["kernels"],
                           latency_ms=final["latency_ms"], latency_vs_float=final["latency_vs_float"])
                if m is evals[-1]:
                    row["perplexity_rerun"] = final["perplexity"]
                    if "kl" not in row and "kl" in final:      # a run from before fidelity: measured here
                        row.update(fidelity_fields(final), fidelity_from="rerun of the final model")
                    if abs(final["perplexity"] / ppl - 1) > 0.005:
                        _log(f"warning: {model} gives perplexity {final['perplexity']:.3f} here, the run's "
                             f"last evaluation {ppl:.3f}")
            else:
                row.update(integer_share=None, kernels=None, latency_ms=None, latency_vs_float=None)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ table / plot

def finish_row(row: dict, float_ppl: float) -> dict:
    base = row.get("float_ppl_run") or float_ppl
    row["increase_pct"] = round(100 * (row["perplexity"] / base - 1), 3) if row.get("perplexity") else None
    return row


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, k in (("MB", 2**20), ("kB", 2**10)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b} B"


def markdown_table(result: dict) -> str:
    lines = ["| row | source | profile | perplexity | vs float [95%] | KL (nats/token) | top-1 | out of domain: "
             "vs float, KL | integer MatMuls | latency / batch | avg weight bits, 16-bit activations | rounds "
             "| bytes per client |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        k = r.get("kernels") or {}
        ints = integer_kernels(k)
        share = f"{ints}/{sum(k.values())}" if k else "-"
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.0f} ms"
        if r.get("latency_vs_float") not in (None, 1.0) and r["source"] != "float":
            lat += f" ({r['latency_vs_float']:.2f}x)"
        inc = "-" if r.get("increase_pct") is None else f"{r['increase_pct']:+.1f}%"
        if r.get("vs_float_pct_ci"):
            inc += " [{:+.1f}, {:+.1f}]".format(*r["vs_float_pct_ci"])
        kl = "-" if r.get("kl") is None else f"{r['kl']:.3f}"
        top1 = "-" if r.get("top1") is None else f"{100 * r['top1']:.1f}%"
        o = r.get("ood") or {}
        ood = "-" if "kl" not in o else "{:+.1f}% [{:+.1f}, {:+.1f}], {:.3f}".format(
            o["vs_float_pct"], *o["vs_float_pct_ci"], o["kl"])
        bits = "-" if r.get("avg_weight_bits") is None else \
            f"{r['avg_weight_bits']:.2f}, {r['act16_points']}/{r['act_points']}"
        lines.append(f"| {r['label']} | {r['source']} | {r['profile']} | {r['perplexity']:.2f} | {inc} | "
                     f"{kl} | {top1} | {ood} | {share} | {lat} | {bits} | {r.get('rounds') if r.get('rounds') is not None else '-'} | "
                     f"{fmt_bytes(r.get('bytes_per_client'))} |")
    return "\n".join(lines) + "\n"


COLORS = {"float": "#777777", "peer": "#d62728", "reference": "#2ca02c", "fedquant": "#1f77b4"}


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["source"] != "float" and r.get("increase_pct") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    vals = [r["increase_pct"] for r in rows]
    ax.barh(range(len(rows)), vals, color=[COLORS.get(r["source"], "#2ca02c") for r in rows])
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    if vals and min(vals) > 0:
        ax.set_xscale("log")                 # bars from a power of ten below the smallest
        ax.set_xlim(left=10 ** np.floor(np.log10(min(vals))), right=max(vals) * 2)
    else:
        ax.set_xscale("symlog", linthresh=1.0)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:+.1f}%" if abs(v) >= 1 else f" {v:+.3f}%", va="center", fontsize=7)
    ax.set_xlabel(f"perplexity increase over float ({result['float_perplexity']:.1f}), %")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for s, c in COLORS.items() if s != "float"]
    ax.legend(handles, [s for s in COLORS if s != "float"], loc="best", fontsize=8)
    ax.set_title(f"{result['config']['model']}, held-out roles, ONNX Runtime integer model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _machine() -> dict:
    """bench.common.machine, "cpu" being the model name (the README's quality-bench block shows it)."""
    import onnxruntime

    return machine(platform=platform.platform(), cpu=cpu_model(), onnxruntime=onnxruntime.__version__)


# -------------------------------------------------------------------------------------- main

def _parse_run(spec: str) -> tuple[Path, str]:
    path, _, label = spec.partition("=")
    return Path(path), label or f"fedquant {Path(path).name}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None, help="default: configs/default.toml "
                    "(configs/smoke.toml with --quick)")
    ap.add_argument("--quick", action="store_true", help="the smoke config's tiny model: seconds")
    ap.add_argument("--runs", nargs="*", default=[], metavar="DIR[=LABEL]",
                    help="fedquant simulate run directories to add as rows")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for quality_bench.json/.png")
    ap.add_argument("--fresh", action="store_true", help="recalibrate the cached peer models")
    ap.add_argument("--only", nargs="*", default=None, help="peer recipes to run (default: all)")
    ap.add_argument("--latency-runs", type=int, default=None, help="timed runs per model (default 3, quick 2)")
    ap.add_argument("--calib-batch", type=int, default=4, help="sequences per calibration batch")
    ap.add_argument("--ort-weights", choices=("u8", "s8", "s8-reduce-range"), default="u8",
                    help="how ORT's int8 weights are stored/run (module docstring)")
    args = ap.parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)   # not the "optimized model is hardware specific" notes
    t_start = time.perf_counter()
    config = args.config or ROOT / "configs" / ("smoke.toml" if args.quick else "default.toml")
    runs = args.latency_runs or (2 if args.quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)

    settings = {"ort_weights": args.ort_weights, "calib_batch": args.calib_batch}
    from simulation.prepare import load_simulation_config

    model_key = hashlib.sha256(load_simulation_config(config).model.encode()).hexdigest()[:12]
    float_work = cache_root() / "float" / model_key   # tiny/local models: exported once per model
    _log(f"loading {config.name}: model, clients, held-out roles, float graph")
    d = load_data(config, float_work)
    digest = data_digest(d, settings)
    cache = cache_root() / digest
    _log(f"{len(d.train)} pooled training sequences, {len(d.evals)} held-out, {len(d.random)} random; "
         f"cache {cache}")
    with tempfile.TemporaryDirectory(prefix="fedquant-quality-") as tmp:
        ev = Evaluator(d.float_onnx, d.evals, Path(tmp), runs, ood=d.ood)
        f = ev.float
        rows = [finish_row({"label": "float", "recipe": "float", "source": "float", "profile": "float",
                            "perplexity": f["perplexity"], "integer_share": f["integer_share"],
                            "kernels": f["kernels"], "latency_ms": f["latency_ms"], "latency_vs_float": 1.0,
                            "rounds": None, "bytes_per_client": None, "seconds": None,
                            "ood_perplexity": f.get("ood_perplexity")}, ev.float_ppl)]
        _log(f"float: perplexity {ev.float_ppl:.3f}, {f['latency_ms']} ms / batch")
        for recipe, label, data, method in PEERS:
            if args.only is not None and recipe not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                path, meta = peer_model(d, recipe, data, method, cache, args.fresh, args.calib_batch,
                                        args.ort_weights)
                r = ev.evaluate(path)
            except Exception as e:               # a recipe that fails is a row with its error
                _log(f"{recipe}: failed: {type(e).__name__}: {e}")
                rows.append({"label": label, "recipe": recipe, "source": "peer", "profile": PROFILE,
                             "perplexity": None, "increase_pct": None, "integer_share": None,
                             "latency_ms": None, "rounds": None, "bytes_per_client": None,
                             "seconds": None, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                continue
            row = {"label": label, "recipe": recipe, "source": "peer", "profile": PROFILE,
                   "perplexity": r["perplexity"], **fidelity_fields(r), "integer_share": r["integer_share"],
                   "kernels": r["kernels"],
                   "latency_ms": r["latency_ms"], "latency_vs_float": r["latency_vs_float"], "rounds": None,
                   "bytes_per_client": None, "seconds": meta["seconds"], "raw_data_leaves_clients": data == "train",
                   "calibration_data": "random token ids" if data == "random" else "pooled training data",
                   "settings": meta, "eval_seconds": round(time.perf_counter() - t0, 1),
                   "peak_rss_mb": peak_rss_mb()}
            rows.append(finish_row(row, ev.float_ppl))
            _log(f"{recipe}: perplexity {r['perplexity']:.3f} ({row['increase_pct']:+.1f}%), integer "
                 f"{r['integer_share']:.3f}, {r['latency_ms']} ms, calibration {meta['seconds']} s"
                 f"{' (cached)' if meta['cached'] else ''}, peak RSS {peak_rss_mb()} MB")
        for spec in args.runs:
            run_dir, label = _parse_run(spec)
            refs = reference_rows(run_dir, label) if spec is args.runs[0] else []
            rows += [finish_row(r, ev.float_ppl) for r in refs + fedquant_rows(run_dir, label, ev, d)]
        rows[0]["latency_ms"] = round(statistics.median(ev.float_times) * 1e3, 1)
    cfg = d.cfg
    result = {
        "format": FORMAT, "machine": _machine(),
        "config": {"path": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                   "model": cfg.model, "seq_len": cfg.data.seq_len, "clients": cfg.data.clients,
                   "seed": cfg.data.seed, "profile": PROFILE},
        "data": {**d.about, "pooled_train_sequences": int(len(d.train)), "eval_sequences": int(len(d.evals)),
                 "random_sequences": int(len(d.random)), "eval_tokens": int(d.evals.size - len(d.evals))},
        "float_perplexity": ev.float_ppl, "latency": {"batch": [min(8, len(d.evals)), cfg.data.seq_len],
                                                      "threads": 1, "runs": runs, "statistic": "median"},
        "settings": settings, "cache": shown_path(cache), "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1), "peak_rss_mb": peak_rss_mb(),
        "command": "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out / "quality_bench.json", result)
    plot(result, args.out / "quality_bench.png")
    print(markdown_table(result))
    _log(f"wrote {args.out / 'quality_bench.json'} and .png in {result['wall_s']} s, peak RSS "
         f"{result['peak_rss_mb']} MB")
    return result


if __name__ == "__main__":
    main()

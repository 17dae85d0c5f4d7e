"""The first quality table: how much perplexity each calibration recipe costs on held-out roles.

Central calibration only (the federated version of the same recipes is the simulation's job):
SmolLM2 float vs fake-quant W8A8 (int8 per-channel weights, 8-bit per-tensor activations at every
Linear input) calibrated on (a) random token ids, the common ``representative_dataset`` recipe, and
(b) real sequences from the training roles, with every calibrator of ``quant.calibrate``; plus W8
alone and W8A16. Held-out roles are never seen by calibration.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from quant.calibrate import CalibratorConfig
from quant.instrument import (QuantConfig, fingerprint, get_qparams, quantize_, set_mode,
                              set_qparams)
from quant.ptq import activation_qparams, activation_specs, calibration_stats
from quant.qparams import QParams, save_qparams
from quant.spec import activation_spec, weight_spec

Method = Literal["minmax", "percentile", "mse", "entropy"]


class QualityConfig(BaseModel):
    """What `fedquant quality` measures."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="smollm2, tiny-llama, tiny-qwen2, an HF dir or a .gguf")
    seq_len: int = Field(256, ge=8)
    eval_sequences: int = Field(32, ge=1, description="held-out sequences for perplexity")
    calib_sequences: int = Field(128, ge=1, description="calibration sequences (real and random)")
    batch_size: int = Field(8, ge=1)
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of roles held out")
    bins: int = Field(2048, ge=16, description="histogram bins per activation point")
    calibrators: list[Method] = ["minmax", "percentile", "mse", "entropy"]
    percentile: float = Field(99.999, gt=0, le=100)
    seed: int = 0


def _batches(ids: torch.Tensor, batch_size: int):
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def prepare_data(cfg: QualityConfig, tokenizer, vocab_size: int):
    """(calibration ids from training roles, random ids, evaluation ids from held-out roles)."""
    from simulation.sequences import random_token_sequences, to_sequences
    from simulation.shakespeare import load_roles, split_roles

    train, held = split_roles(load_roles(), cfg.heldout_fraction, cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    def shuffled(roles):
        texts = [s for r in roles for s in r.speeches]
        return [texts[i] for i in rng.permutation(len(texts))]

    calib = to_sequences(shuffled(train), tokenizer, cfg.seq_len, cfg.calib_sequences)
    evals = to_sequences(shuffled(held), tokenizer, cfg.seq_len, cfg.eval_sequences)
    rand = random_token_sequences(vocab_size, cfg.calib_sequences, cfg.seq_len, cfg.seed)
    return calib, rand, evals, {"train_roles": len(train), "heldout_roles": len(held)}


def run_quality(cfg: QualityConfig, out: Path | None = None, progress=None, on_row=None) -> dict:
    """Measure every row; write ``quality.json``, ``quality.md`` and each recipe's QParams
    (``qparams/<recipe>.safetensors``) under ``out``.
    ``progress(desc, total)`` gives a bar context; ``on_row(row)`` hears each finished row."""
    from simulation.models import load_model

    t0 = time.time()
    model, tokenizer = load_model(cfg.model)
    vocab = model.config.vocab_size
    calib, rand, evals, split = prepare_data(cfg, tokenizer, vocab)
    bar = progress or (lambda desc, total: _NoBar())

    def ppl(m) -> float:
        with bar("evaluate", len(_batches(evals, cfg.batch_size))) as b:
            total_nll, count = 0.0, 0
            from simulation.sequences import nll_sum_and_count
            with torch.no_grad():
                for ids in _batches(evals, cfg.batch_size):
                    nll, n = nll_sum_and_count(m(input_ids=ids).logits.float().numpy(), ids.numpy())
                    total_nll, count = total_nll + nll, count + n
                    b.advance()
        return float(np.exp(total_nll / count))

    rows = []

    def row(name, weights, acts, data, calibrator, value):
        rows.append({"recipe": name, "weights": weights, "activations": acts, "calibration_data": data,
                     "calibrator": calibrator, "ppl": value})
        if on_row:
            on_row(rows[-1])

    float_ppl = ppl(model)
    row("float", "fp32", "fp32", "-", "-", float_ppl)

    def instrumented(act_spec):
        m = copy.deepcopy(model)
        quantize_(m, QuantConfig(activation=act_spec, weight=weight_spec(8)))
        return m

    def calibrate_rows(m, label_w, label_a, methods, sources):
        specs = activation_specs(m)
        for source_name, ids in sources:
            set_mode(m, "float", "activations")
            batches = _batches(ids, cfg.batch_size)
            with bar(f"scout + histograms ({source_name})", 2 * len(batches)) as b:
                stats = calibration_stats(m, batches, cfg.bins, on_batch=b.advance)
            for method in methods:  # one pass of statistics serves every calibrator
                cal = CalibratorConfig(method=method, percentile=cfg.percentile)
                points = activation_qparams(stats, specs, cal)
                set_qparams(m, QParams(points, model=fingerprint(m)))
                set_mode(m, "quant", "activations")
                if out is not None:  # each recipe's QParams, ready for `fedquant export`
                    tag = f"{label_w}{label_a}-{method}-{source_name.split()[0]}"
                    save_qparams(get_qparams(m), out / "qparams" / f"{tag}.safetensors")
                row(f"{label_w}{label_a} {method}", "int8 per-channel",
                    f"{activation_type_label(specs)} per-tensor", source_name,
                    method if method != "percentile" else f"percentile {cfg.percentile}", ppl(m))

    m = instrumented(activation_spec(8))
    set_mode(m, "float", "activations")
    row("W8 (activations float)", "int8 per-channel", "fp32", "-", "-", ppl(m))
    sources = [(f"random tokens x{len(rand)}", rand), (f"real text x{len(calib)}", calib)]
    calibrate_rows(m, "W8", "A8", cfg.calibrators, sources)
    del m
    m16 = instrumented(activation_spec(16))
    calibrate_rows(m16, "W8", "A16", ["minmax"], [(f"real text x{len(calib)}", calib)])
    del m16

    for r in rows:
        r["increase_pct"] = 100.0 * (r["ppl"] / float_ppl - 1.0)
    result = {
        "config": cfg.model_dump(),
        "split": split,
        "eval_tokens": int(evals.numel()),
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
        "machine": machine_info(),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(result, indent=2))
        (out / "quality.md").write_text(markdown_table(result))
    return result


def activation_type_label(specs: dict) -> str:
    """'uint8', 'int16', ... : the storage type of the model's activation points."""
    return ", ".join(sorted({sp.onnx_type_name for sp in specs.values()}))


def markdown_table(result: dict) -> str:
    lines = ["| recipe | weights | activations | calibration data | calibrator | PPL | vs float |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        inc = "" if r["recipe"] == "float" else f"{r['increase_pct']:+.1f}%"
        lines.append(f"| {r['recipe']} | {r['weights']} | {r['activations']} | {r['calibration_data']} "
                     f"| {r['calibrator']} | {r['ppl']:.2f} | {inc} |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    """Where a number was measured: the CPU's model and SIMD flags (ONNX Runtime's integer kernels
    differ by CPU), cores, python, torch and its threads."""
    import os

    from simulation.machine import cpu_model, simd_flags
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "simd": simd_flags(),
            "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self):
        pass

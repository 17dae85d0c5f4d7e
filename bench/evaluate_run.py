"""Evaluate a finished run directory's QParams on the honest evaluation set (issue 19).

    .venv/bin/python -m bench.evaluate_run --run runs/default         # SmolLM2: about 20 minutes
    .venv/bin/python -m bench.evaluate_run --run runs/smoke --out eval.json   # the tiny model: seconds

For each profile of the run: its starting QParams (random-token calibration), the centralized
reference (the same recipe on the pooled training data, when the run scouted) and the run's final
federated QParams, each evaluated with the ONNX Runtime integer model of the run's device
directory on

- the held-out roles of the run's own split (roles no client held), ``--eval-sequences`` windows
  drawn in turn across all of them (``simulation.fleet.round_robin_sequences``), and
- the out-of-domain text (the CIA World Factbook's country backgrounds, ``simulation.factbook``),

with perplexity and its change vs float, KL(float || quantized) per token and top-1 agreement,
each with a seeded bootstrap 95% interval over sequences, computed as the server computes them
(``simulation.evaluation``: the float graph in lockstep, exact). Beside the exact KL, from the
same quantized logits, the KL against a cached top-256 float reference (``float_reference``), the
cheaper way that was measured here and not chosen; the forward passes are timed apart (quantized
model, float model). The run directory is only read; one profile's runtime is held at a time.
Writes ``bench/results/evaluate_run.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, command_line, finished_run, machine, quiet_env, shown_run, write_json


def timed(fn, seconds: list):
    """``fn`` whose wall time per call is added to ``seconds[0]``."""
    def run(ids):
        t0 = time.perf_counter()
        out = fn(ids)
        seconds[0] += time.perf_counter() - t0
        return out
    return run


def both_columns(quant_logits, float_logits, ids: np.ndarray, batch_size: int, reference: dict):
    """(exact columns, cached-reference columns) of ``simulation.evaluation.fidelity_columns`` from
    one forward pass of each model per batch (the quantized logits serve both)."""
    from quant.metrics import next_token_fidelity, sequence_nll, top_k_fidelity
    from simulation.evaluation import bounded_batches

    exact, cached = np.zeros((len(ids), 5)), np.zeros((len(ids), 5))
    for i, batch, q in bounded_batches(quant_logits, ids, batch_size):
        rows = slice(i, i + len(batch))
        nq, n = sequence_nll(q, batch), np.full(len(batch), batch.shape[1] - 1)
        f = float_logits(batch)
        kl, agree = next_token_fidelity(f, q)
        exact[rows] = np.stack([nq, sequence_nll(f, batch), kl, agree, n], axis=1)
        del f
        kl_c, agree_c = top_k_fidelity(q, reference["top_ids"][rows], reference["top_logp"][rows])
        cached[rows] = np.stack([nq, reference["nll"][rows], kl_c, agree_c, n], axis=1)
    return exact, cached


def qparams_to_evaluate(run: Path, profile: str) -> list[tuple[str, Path]]:
    rows = [("random-token calibration (start)", run / "initial" / f"{profile}.safetensors"),
            ("centralized, same recipe on pooled data", run / "qparams" / f"{profile}.centralized.safetensors"),
            ("fedquant, final", run / "qparams" / f"{profile}.safetensors")]
    return [(what, f) for what, f in rows if f.is_file()]


def markdown_table(result: dict) -> str:
    def pct(e):
        return "{:+.2f}% [{:+.2f}, {:+.2f}]".format(e["vs_float_pct"], *e["vs_float_pct_ci"])

    def kl(e):
        out = "{:.4f} [{:.4f}, {:.4f}]".format(e["kl"], *e["kl_ci"])
        return out + " (top-256: {:.4f})".format(e["top_k_reference"]["kl"])

    def top1(e):
        return "{:.1f}% [{:.1f}, {:.1f}]".format(100 * e["top1"], *(100 * v for v in e["top1_ci"]))
    lines = ["| profile | QParams | held-out roles: perplexity | vs float [95%] | KL nats/token [95%] | top-1 [95%] "
             "| out of domain: perplexity | vs float [95%] | KL [95%] | top-1 [95%] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        h, o = r["heldout"], r["ood"]
        lines.append(f"| {r['profile']} | {r['qparams']} | {h['perplexity']:.2f} | {pct(h)} | {kl(h)} | {top1(h)} "
                     f"| {o['perplexity']:.2f} | {pct(o)} | {kl(o)} | {top1(o)} |")
    return "\n".join(lines) + "\n"


def readme_block(d: dict) -> str:
    """The README's evaluate-run block: what was measured, where, the table and the timings."""
    m = d["machine"]
    cpu = f"{m.get('cpu_model')} ({' '.join(m.get('simd', [])) or 'no AVX2'}), {m['cores']} cores"
    h, o = d["heldout"], d["ood"]
    times = "; ".join(f"{r['profile']} {r['server_eval_seconds']:.0f} s" for r in d["rows"] if "server_eval_seconds" in r)
    return (f"`python -m bench.evaluate_run --run {d['run']}` ({d['model']}: {h['sequences']} held-out windows of "
            f"{d['seq_len']} tokens from {h['documents']} roles no client held, {o['sequences']} from {o['documents']} "
            f"Factbook countries; 95% intervals: {d['bootstrap']['resamples']} bootstrap resamples over sequences, "
            f"seed {d['bootstrap']['seed']}; KL in nats per token, exact, with the cached top-{d['top_k']} lower bound "
            f"in parentheses; ONNX Runtime integer model, {d['threads']} threads; {cpu}; {d['wall_s']:.0f} s). "
            f"Float perplexity: {d['float_perplexity']['heldout']:.2f} on the held-out roles, "
            f"{d['float_perplexity']['ood']:.2f} on the Factbook. One server evaluation of the final QParams "
            f"(both texts, float in lockstep, patch included): {times}. "
            f"Source: `bench/results/evaluate_run.json`.\n\n" + markdown_table(d) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a fedquant simulate run directory (read only)")
    ap.add_argument("--eval-sequences", type=int, default=64, help="held-out windows, across all held-out roles")
    ap.add_argument("--ood-sequences", type=int, default=64, help="out-of-domain windows, across countries")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "evaluate_run.json")
    args = ap.parse_args(argv)
    quiet_env()
    import onnxruntime
    import torch

    from quant.qparams import QParams, load_qparams
    from simulation.evaluation import ServerEval, fidelity_summary, float_reference

    onnxruntime.set_default_logger_severity(3)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    print("loading the run's tokenizer and split", file=sys.stderr)
    texts = finished_run(args.run, args.eval_sequences, args.ood_sequences)
    cfg, evals, ood, about, ood_ids = texts.cfg, texts.evals, texts.ood, texts.about, texts.ood_ids
    profiles = [(e.load().name, e.share) for e in cfg.fleet]
    sets = {"heldout": evals, "ood": ood}
    ev = ServerEval(args.run / "device", evals, args.threads, args.batch_size, ood=ood)
    ev.runtime(profiles[0][0])
    float_s, quant_s, ref_s = [0.0], [0.0], {}
    float_logits = timed(ev.float_logits, float_s)
    refs = {}
    for name, ids in sets.items():
        t0 = time.perf_counter()
        refs[name] = float_reference(ev.float_logits, ids, args.batch_size)
        ref_s[name] = round(time.perf_counter() - t0, 1)
        print(f"float reference of {name}: {ref_s[name]} s", file=sys.stderr)
    rows = []
    for profile, _ in profiles:
        rt = ev.runtime(profile)
        for what, f in qparams_to_evaluate(args.run, profile):
            qp = load_qparams(f)
            if int(qp.version) < int(rt.qparams.version):
                qp = QParams(qp.points, qp.model, rt.qparams.version, qp.smoothing, qp.meta)
            rt.patch(qp)
            row = {"profile": profile, "qparams": what, "file": str(f.relative_to(args.run))}
            for name, ids in sets.items():
                float_s[0] = quant_s[0] = 0.0
                t0 = time.perf_counter()
                exact, cached = both_columns(timed(rt.logits, quant_s), float_logits, ids, args.batch_size,
                                             refs[name])
                res = fidelity_summary(exact, seed=cfg.data.seed)
                res["top_k_reference"] = {k: v for k, v in fidelity_summary(cached, seed=cfg.data.seed).items()
                                          if k in ("kl", "kl_ci", "top1", "vs_float_pct")}
                res["seconds"] = {"quantized_forward": round(quant_s[0], 1), "float_forward": round(float_s[0], 1),
                                  "total": round(time.perf_counter() - t0, 1)}
                row[name] = res
            if what == "fedquant, final":      # what one evaluation costs the server, as a run does it
                t0 = time.perf_counter()
                again = ev(profile, qp)
                row["server_eval_seconds"] = round(time.perf_counter() - t0, 1)
                assert again["perplexity"] == row["heldout"]["perplexity"], "ServerEval disagrees with this bench"
            rows.append(row)
            h, o = row["heldout"], row["ood"]
            print(f"{profile} {what}: held-out {h['perplexity']:.2f} ({h['vs_float_pct']:+.2f}%) KL {h['kl']:.4f} "
                  f"(top-k {h['top_k_reference']['kl']:.4f}) top-1 {100 * h['top1']:.1f}%; out of domain "
                  f"{o['perplexity']:.2f} ({o['vs_float_pct']:+.2f}%) KL {o['kl']:.4f}; {h['seconds']} {o['seconds']}",
                  file=sys.stderr)
        ev.runtimes.pop(profile)                  # one profile's runtime in memory at a time
    result = {"format": "fedquant.evaluate_run/1", "machine": machine(onnxruntime=onnxruntime.__version__),
              "run": shown_run(args.run),
              "model": cfg.model, "seq_len": cfg.data.seq_len, "batch_size": args.batch_size, "threads": args.threads,
              "bootstrap": {"resamples": 1000, "seed": cfg.data.seed, "level": 0.95, "unit": "sequence"},
              "float_perplexity": {n: float(np.exp(r["nll"].sum() / (len(r["nll"]) * (cfg.data.seq_len - 1))))
                                   for n, r in refs.items()},
              "float_reference_seconds": ref_s, "top_k": int(refs["heldout"]["top_ids"].shape[-1]),
              "heldout": {"sequences": int(len(evals)), "documents": about["eval_documents"], "ids": about["eval_ids"]},
              "ood": {"source": "CIA World Factbook, Introduction/Background (simulation.factbook)",
                      "sequences": int(len(ood)), "documents": len({w["id"] for w in ood_ids}), "ids": ood_ids},
              "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1),
              "command": command_line("bench.evaluate_run", argv)}
    write_json(args.out, result)
    print(markdown_table(result))
    print(f"wrote {args.out} in {result['wall_s']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

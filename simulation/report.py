"""What a run leaves behind (design.md section 8): ``scales.jsonl`` round by round, then the
final QParams, QDQ ONNX model and AIMET/QNN encodings per profile, the centralized reference,
``summary.json`` and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quant.qparams import QParams, atomic_write_bytes, save_qparams
from simulation.evaluation import ServerEval, centralized_qparams
from simulation.prepare import RUN_FORMAT, Prepared, say


def record_scales(out: Path, round_: int) -> None:
    """Append each profile's activation scales after ``round_`` to ``scales.jsonl`` (from the
    checkpoint just written), for the drift plot; a resumed run rewrites the rounds it repeats."""
    from server.state import load_checkpoint

    state = load_checkpoint(out / "checkpoint.safetensors")
    row = {"round": int(round_), "profiles": {
        p: {"version": int(qp.version),
            "scales": {k: float(np.asarray(pt.scale).reshape(-1)[0]) for k, pt in sorted(qp.points.items())
                       if k.endswith((":input", ":other"))}}
        for p, qp in state.qparams.items()}}
    f = out / "scales.jsonl"
    kept = [line for line in (f.read_text().splitlines() if f.is_file() else [])
            if line.strip() and json.loads(line)["round"] < round_]
    atomic_write_bytes(f, ("\n".join(kept + [json.dumps(row)]) + "\n").encode())


def report(prep: Prepared, ev: "ServerEval", refs: dict, final: dict[str, QParams], progress=None,
           wall_s: float | None = None) -> dict:
    """After the federation: the artifacts, the centralized reference, summary.json and plots."""
    from server.state import load_checkpoint
    from simulation.plots import plot_run

    say(progress, "writing the final QParams, QDQ models and encodings")
    artifacts = write_artifacts(prep, ev, final)
    say(progress, "centralized reference: the same calibrator on the pooled training data")
    state = load_checkpoint(prep.out / "checkpoint.safetensors")
    if state.grids:         # the run scouted: compare it with the same recipe on pooled data
        central = centralized_qparams(prep)
        for p, qp in central.items():
            save_qparams(qp, prep.out / "qparams" / f"{p}.centralized.safetensors")
            r = ev(p, qp)
            refs[p]["centralized_ppl"], refs[p]["centralized"] = r["perplexity"], r
            if "plan" in qp.meta:
                refs[p]["centralized_plan"] = json.loads(qp.meta["plan"])
    summary = summarise(prep, refs, artifacts, wall_s if wall_s is not None else prep.prepare_s)
    summary["plots"] = plot_run(prep.out, summary)
    atomic_write_bytes(prep.out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def write_artifacts(prep: Prepared, ev: ServerEval, final: dict[str, QParams]) -> dict[str, dict]:
    """Per profile: the final QParams (safetensors), the QDQ ONNX model the evaluation ran (with its
    name map) and encodings JSON in the AIMET/QNN style (design.md section 8), unless the QParams
    carry GPTQ's codes (``encodings`` None: ranges alone would give a consumer other weights)."""
    import onnx

    from quant.encodings import onnx_encoding_names, write_encodings_json
    from quant.onnxfile import save_onnx
    from quant.qdq import names_path

    names = onnx_encoding_names(onnx.load(str(prep.float_onnx), load_external_data=False))
    out = {}
    for p, qp in final.items():
        d = prep.out / "export" / p
        d.mkdir(parents=True, exist_ok=True)
        rt = ev.runtime(p)
        rt.patch(qp)
        # int8 weights as exported, whatever this CPU runs; external data past 1 GB, atomically
        save_onnx(rt.canonical_model(), d / "model.onnx")
        # the runtime's own name map: a plan's QParams rebuilt its graph (client.runtime), so the
        # bundle's file beside rt.path may describe the graph it started from
        atomic_write_bytes(names_path(d / "model.onnx"), json.dumps(
            {k: list(v) for k, v in sorted(rt.name_map.items())}, indent=1).encode())
        save_qparams(qp, prep.out / "qparams" / f"{p}.safetensors")
        out[p] = {"qparams": str(prep.out / "qparams" / f"{p}.safetensors"), "onnx": str(d / "model.onnx"),
                  "version": int(qp.version)}
        if qp.codes:    # GPTQ's codes are integer weights, which encodings (ranges only) cannot carry
            out[p]["encodings"] = None
            (d / "encodings.json").unlink(missing_ok=True)
        else:
            write_encodings_json(qp, d / "encodings.json", names=names)
            out[p]["encodings"] = str(d / "encodings.json")
    return out


def read_metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def summarise(prep: Prepared, refs: dict, artifacts: dict, wall_s: float) -> dict:
    """summary.json (issue: per profile float/random/centralized/federated perplexity, bytes per
    client per round, clients, rounds, wall time). Beside each perplexity, what the evaluation
    measured of it (``simulation.evaluation.fidelity_summary``: KL and top-1 agreement with float,
    intervals, the out-of-domain text under ``ood``): ``federated_eval`` per evaluation round,
    ``random_calib`` and ``centralized``; older runs without them load with these missing."""
    from server.privacy import run_privacy
    from simulation.quality import machine_info

    lines = read_metrics(prep.out)
    profiles = {}
    for p in prep.initial:
        fed, fed_eval, up, down = [], [], [], []
        for m in lines:
            ev = (m.get("server_eval") or {}).get(p)
            if ev is not None:
                fed.append(ev["perplexity"] if isinstance(ev, dict) else ev)
                if isinstance(ev, dict) and "kl" in ev:
                    fed_eval.append({"round": m["round"], **ev})
            b = (m.get("bytes") or {}).get(p) or {}
            if b.get("up_per_client"):
                up.append({"round": m["round"], "job": m["job"], "bytes": b["up_per_client"]})
            if b.get("down_per_client"):
                down.append({"round": m["round"], "job": m["job"], "bytes": b["down_per_client"]})
        r = refs.get(p, {})
        profiles[p] = {"float_ppl": r.get("float_ppl"), "random_calib_ppl": r.get("random_calib_ppl"),
                       "centralized_ppl": r.get("centralized_ppl"), "federated_ppl": fed,
                       "federated_eval": fed_eval, "random_calib": r.get("random_calib"),
                       "centralized": r.get("centralized"),
                       "bytes_up_per_client_round": up, "bytes_down_per_client_round": down,
                       "clients": sum(1 for c in prep.clients if c.profile == p),
                       "artifacts": artifacts.get(p, {})}
        plan = next((m["plan"][p] for m in lines if (m.get("plan") or {}).get(p)), None)
        if plan is not None:        # the fleet's mixed-precision plan (plan.json has it too)
            profiles[p]["plan"] = {k: v for k, v in plan.items() if k != "sensitivity"}
            if r.get("centralized_plan") is not None:
                c = r["centralized_plan"]
                profiles[p]["plan"]["centralized_overlap"] = {
                    "weights8": len(set(c["weights8"]) & set(plan["weights8"])), "act16": len(set(c["act16"]) & set(plan["act16"])),
                    "centralized_weights8": c["weights8"], "centralized_act16": c["act16"]}
    summary = {"format": RUN_FORMAT, "name": prep.cfg.name, "model": prep.cfg.model, "profiles": profiles,
               "clients": len(prep.clients), "rounds": len(lines), "data": prep.about,
               "wall_s": round(wall_s, 1), "prepare_s": round(prep.prepare_s, 1), "machine": machine_info()}
    summary["privacy"] = run_privacy(prep.cfg.server, lines)
    alerts = [{"round": m["round"], "job": m["job"], **{k: m[k] for k in ("alert", "skipped") if m.get(k)}}
              for m in lines if m.get("alert") or m.get("skipped")]
    if alerts:                          # rounds to distrust: most replies failed, or nothing was applied
        summary["alerts"] = alerts
    return summary

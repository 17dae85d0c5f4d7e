"""A LiteRT phone's jobs against an ONNX Runtime phone's, on the same data (issue 18): the
statistics job, the evaluation job and the patch of a release, through ``client.app.get_runtime``
(what a node of each profile runs), from the device directory of a finished mixed-fleet run.

    .venv-litert/bin/python -m simulation.cli simulate --config configs/litert-smoke.toml --out runs/litert-smoke
    .venv-litert/bin/python -m bench.litert_fleet --run runs/litert-smoke     # -> bench/results/litert_fleet.json

Both runtimes get the pooled training sequences of every node (statistics, on the run's grids,
with the held QParams: no patch inside the timing) and the pooled test sequences (evaluation),
the requested batch the run's ``batch_size``; each job runs once to warm up, then ``--reps``
times alternating between the runtimes (machine load hits both alike), median kept. The patch is
a release with every activation scale x1.1 (then back), median of ``--reps``. Threads: the
profiles' (1). Needs the fedquant[litert] extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import machine, quiet_env, shown_path, versions, write_json

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ai-edge-litert", "onnxruntime", "litert-torch", "torch")


def _profiles(device_dir: Path) -> dict[str, str]:
    """runtime -> the first profile of the directory that runs it."""
    from client.device import load_device_profile, read_fleet

    out: dict[str, str] = {}
    for name in read_fleet(device_dir)["profiles"]:
        out.setdefault(load_device_profile(device_dir, name).runtime, name)
    if set(out) != {"onnxruntime", "litert"}:
        raise SystemExit(f"{device_dir}: needs an ONNX Runtime and a LiteRT profile, has {out}")
    return out


def _pooled(device_dir: Path, split: str) -> np.ndarray:
    from client.device import load_node_data, read_fleet

    return np.concatenate([load_node_data(device_dir, pid)[split] for pid in sorted(read_fleet(device_dir)["nodes"], key=int)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "litert-smoke",
                    help="a finished run of a fleet with an ORT and a LiteRT profile")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "litert_fleet.json")
    args = ap.parse_args(argv)
    quiet_env()

    from client import app as capp
    from client import jobs
    from client.device import load_device_profile
    from quant.qparams import PointParams, QParams
    from server.state import load_checkpoint

    run, device_dir = args.run, args.run / "device"
    config = json.loads((run / "run.json").read_text())["config"]
    batch = int(config["server"]["batch_size"])
    state = load_checkpoint(run / "checkpoint.safetensors")
    by_runtime = _profiles(device_dir)
    train, test = _pooled(device_dir, "train"), _pooled(device_dir, "test")
    rts = {r: capp.get_runtime(str(device_dir), p) for r, p in by_runtime.items()}
    profs = {r: load_device_profile(device_dir, p) for r, p in by_runtime.items()}

    from quant.wire import Instruction

    ins = {}
    for r, p in by_runtime.items():
        held = rts[r].qparams
        keys = [k for k in held.points if k.endswith(":input")]
        grids = {k: state.grids[k] for k in keys}
        ins[r] = Instruction(round=1, job="stats", qparams=held.with_points({}), grids=grids)

    def stats(r):
        return jobs.statistics(rts[r], ins[r], train, batch_size=batch, profile=profs[r])[1]["wall_s"]

    def evaluate(r):
        return jobs.evaluate(rts[r], None, test, batch_size=batch, profile=profs[r])["wall_s"]

    flip = {}

    def patch(r):
        held = rts[r].qparams
        f = 1.1 if not flip.get(r) else 1 / 1.1
        flip[r] = not flip.get(r)
        pts = {k: PointParams(p.spec, (np.asarray(p.scale, np.float32) * np.float32(f)).astype(np.float32), p.zero_point)
               for k, p in held.points.items() if k.endswith(":input")}
        release = QParams(pts, held.model, int(held.version) + 1)     # what a round sends
        t0 = time.perf_counter()
        rts[r].patch(release)
        return time.perf_counter() - t0

    times: dict[str, dict[str, list[float]]] = {j: {r: [] for r in rts} for j in ("stats", "eval", "patch")}
    for name, fn in (("stats", stats), ("eval", evaluate), ("patch", patch)):
        for r in rts:
            fn(r)                                   # warm-up
        for _ in range(args.reps):
            for r in rts:
                times[name][r].append(fn(r))
    med = {j: {r: statistics.median(v) for r, v in d.items()} for j, d in times.items()}
    model = config["model"]
    result = {
        "command": f"python -m bench.litert_fleet --run {shown_path(run)} --reps {args.reps}",
        "model": model, "profiles": by_runtime, "train_sequences": int(len(train)),
        "test_sequences": int(len(test)), "seq_len": int(train.shape[1]), "batch_size": batch,
        "points": len(ins["litert"].grids),
        "median_s": med, "litert_over_ort": {j: med[j]["litert"] / med[j]["onnxruntime"] for j in med},
        "reps": times, "machine": machine(), "versions": versions(PACKAGES),
    }
    write_json(args.out, result)
    for j in med:
        print(f"{j:6s} ORT {med[j]['onnxruntime'] * 1e3:9.1f} ms   LiteRT {med[j]['litert'] * 1e3:9.1f} ms   "
              f"LiteRT/ORT {result['litert_over_ort'][j]:.2f}")
    print(f"wrote {shown_path(args.out)}")
    return result


if __name__ == "__main__":  # pragma: no cover
    main()

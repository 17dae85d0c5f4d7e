"""What a client's round costs on the device: the statistics job and the learned-range job, against
one plain float and one plain integer inference pass over the same batch, in the same run.

On SmolLM2 with one ORT thread (and one torch thread for the learned-range job), each measured thing
runs in its own fresh process (forked by a multiprocessing fork server that has only imported the
libraries, so imports are paid once), because the resident high-water mark of a process never goes
down: the worker loads what it needs, frees the heap (malloc_trim), resets the high-water mark
(``/proc/self/clear_refs`` <- "5"; else a 5 ms RSS polling thread), records its RSS as the baseline,
runs the job and reports the peak RSS over that baseline and the wall time. Each worker runs its job
twice: the first run after loading ("cold": its peak includes ORT's arena growing to the job's
working set, which is the memory a phone must have free for the job) and a second one ("warm": the
time of a client that keeps its runtime between rounds). The ratios use the warm time and the cold
peak of every job alike. Workers run interleaved (rep 1 of every job, then rep 2, ...) so machine
load hits all alike, and the median of the reps is kept.

Also measured: ``DeviceRuntime.patch`` with a full new activation QParams set (every activation scale
x1.1; its compute / initializer patch / session rebuild split from ``last_patch``) and the build time
of the integer session, of the float session and of the statistics capture session.

The plan job (issue 19, ``client.plan``: FIT sensitivity of every point, one torch forward and
backward per sequence, one torch thread) is measured on the same instrumented model and bundle
QParams as the learned-range job, with the mixed profile's 4-bit weight spec (asymmetric, groups of
64) as the low spec its weight errors are taken at: the arithmetic of a mixed phone's plan job.

Targets (the issue): statistics job <= 2x a plain float pass in time and <= 1.5x in peak memory;
the runtime learned-range job (issue 17, ``client.learn_runtime``: ONNX Runtime + numpy) <= 4x
an integer pass in time and <= 1.5x in peak memory; the torch learned-range job is reported as it is.

    .venv/bin/python -m bench.client_jobs --steps 2 # SmolLM2 -> bench/results/client_jobs.json (27 min busy)
    .venv/bin/python -m bench.client_jobs --quick   # tiny Llama, seconds (what the test runs)
    .venv/bin/python -m bench.client_jobs --kinds float int plan --reps 2 \
        --out bench/results/client_jobs_plan.json    # the plan job's rows alone (SmolLM2)
    .venv/bin/python -m bench.client_jobs --kinds float int stats learn_runtime patch \
        --out bench/results/client_jobs_runtime.json  # the runtime job's rows alone (SmolLM2, ~8 min)

The float ONNX export of SmolLM2 (3-4 minutes) and the int8 device bundle are cached under
``~/.cache/fedquant/bench/<model>/`` and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics as pystats
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (RESULTS, ROOT, cache_dir, machine, minmax_points, quiet_env, shown_path, versions,
                          write_json)

quiet_env()

KINDS = ("float", "int", "stats", "learn", "learn_runtime", "patch", "plan")
JOBS = ("stats", "learn", "learn_runtime", "plan")
TARGETS = {"stats_time_vs_float": 2.0, "stats_memory_vs_float": 1.5,
           # issue 17: the learned-range job on the device's runtime, against an integer pass
           "learn_runtime_time_vs_int": 4.0, "learn_runtime_memory_vs_int": 1.5}
BINS = 512
PROFILE = ROOT / "configs" / "profiles" / "int8.toml"
DEFAULT_OUT = RESULTS / "client_jobs.json"


# ------------------------------------------------------------------------------ memory probes

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64


class _Poller:
    """Fallback when clear_refs is refused: the max of VmRSS sampled every 5 ms."""

    def __init__(self):
        self.peak = _status_kb("VmRSS")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kb("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _status_kb("VmRSS"))


def _trim() -> bool:
    """Give free heap memory back to the OS (glibc ``malloc_trim``): otherwise what loading freed
    (e.g. the model protos copied while building a session) stays resident, counts in the baseline,
    and the job's allocations reuse it without raising RSS (measured: 1.5 MB "peak" for the
    statistics job on SmolLM2)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def measure(fn) -> tuple[dict, object]:
    """Wall time and peak RSS over the RSS right before ``fn`` (MB), in this process."""
    gc.collect()
    trimmed = _trim()
    hwm = _reset_hwm()
    poller = None if hwm else _Poller()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if hwm else poller.stop()
    return {"wall_s": wall, "peak_mb": (peak - base) / 1024, "baseline_mb": base / 1024,
            "probe": ("VmHWM after clear_refs" if hwm else "VmRSS polled every 5 ms")
            + (", after malloc_trim" if trimmed else "")}, out


# ------------------------------------------------------------------------------ preparation

def model_key(quick: bool, model=None) -> str:
    """The cache folder's name: SmolLM2's names its GGUF's sha256; the tiny model's, its weights'."""
    if quick:
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
        return f"tiny-llama-{h.hexdigest()[:12]}"
    from simulation.models import smollm2_cache_dir

    return smollm2_cache_dir().name


def load_torch_model(quick: bool):
    from simulation.models import ByteTokenizer, load_smollm2, tiny_llama

    return (tiny_llama(), ByteTokenizer()) if quick else load_smollm2()


def quant_config(profile):
    """The instrumented model matching the profile's device bundle (Linear inputs and weights)."""
    from quant.instrument import QuantConfig
    from quant.spec import activation_spec, weight_spec

    return QuantConfig(activation=activation_spec(profile.activation_bits, profile.activation_signed),
                       weight=weight_spec(profile.weight_bits, profile.weight_group_size))


def client_batches(tokenizer, n: int, seq: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(the client's batch, calibration sequences, where they come from): the largest Shakespeare
    role's training speeches as the client, the second largest role's for the initial min-max."""
    from simulation.sequences import to_sequences
    from simulation.shakespeare import client_split, load_roles

    roles = sorted(load_roles(), key=lambda r: (-r.n_chars, r.client_id))
    client, other = roles[0], roles[1]
    train, _ = client_split(client, 0.2, seed=0)
    data = to_sequences(train, tokenizer, seq, max_sequences=n).numpy()
    calib = to_sequences(client_split(other, 0.2, seed=0)[0], tokenizer, seq, max_sequences=4).numpy()
    if len(data) < n:
        raise ValueError(f"client {client.client_id} has only {len(data)} sequences of {seq} tokens")
    return data, calib, {"client": client.client_id, "calibration_client": other.client_id}


def minmax_qparams(model, calib: np.ndarray, profile):
    """Initial QParams of the instrumented model: min-max of every activation point on a few real
    sequences of another client, weights from the weights."""
    import copy

    import torch

    from quant.instrument import get_qparams, quantize_, set_mode
    from quant.ptq import activation_specs, scout_ranges

    qm = copy.deepcopy(model)
    quantize_(qm, quant_config(profile))
    set_mode(qm, "float")
    ranges = scout_ranges(qm, [torch.from_numpy(calib)])
    return get_qparams(qm).with_points(minmax_points(ranges, activation_specs(qm)))


def prepare(cache: Path, quick: bool, n: int, seq: int, log=print) -> dict:
    """Float ONNX, the int8 device bundle and the client's batch, cached under ``cache``."""
    import torch

    from client.profiles import load_profile
    from client.runtime import bundle_path, save_device_bundle
    from quant.export import export_float_onnx

    torch.set_num_threads(1)
    profile = load_profile(PROFILE)
    model, tok = load_torch_model(quick)
    d = cache / model_key(quick, model)
    d.mkdir(parents=True, exist_ok=True)
    bf = d / f"batch-{n}x{seq}.npz"  # the client's batch and the calibration sequences
    if bf.is_file():
        with np.load(bf, allow_pickle=False) as z:
            data, calib, source = z["data"], z["calib"], json.loads(str(z["source"]))
    else:
        data, calib, source = client_batches(tok, n, seq)
        tmp = bf.with_name(f".{bf.name}.{os.getpid()}.npz")
        np.savez(tmp, data=data, calib=calib, source=np.array(json.dumps(source)))
        os.replace(tmp, bf)
    info = {"dir": str(d), "float_onnx": str(d / "float.onnx"), "bundle": str(d / profile.name / "model.qdq.onnx"),
            "float_export_s": None, "bundle_export_s": None}
    if not (d / "float.onnx").is_file():
        log(f"exporting the float ONNX graph to {d / 'float.onnx'} (SmolLM2: 3-4 minutes, once)")
        t0 = time.perf_counter()
        export_float_onnx(model, d / "float.onnx")
        info["float_export_s"] = round(time.perf_counter() - t0, 1)
    stamp = d / profile.name / "calibration.json"
    want = {"calibration": source["calibration_client"], "calib_shape": list(calib.shape),
            "profile": profile.model_dump(), "float_mtime": (d / "float.onnx").stat().st_mtime}
    if not (bundle_path(info["bundle"]).is_file() and stamp.is_file()
            and json.loads(stamp.read_text()) == want):
        log(f"writing the {profile.name} device bundle to {info['bundle']}")
        t0 = time.perf_counter()
        (d / profile.name).mkdir(exist_ok=True)
        qp = minmax_qparams(model, calib, profile)
        save_device_bundle(model, qp, info["bundle"], float_onnx=d / "float.onnx")
        stamp.write_text(json.dumps(want))
        info["bundle_export_s"] = round(time.perf_counter() - t0, 1)
    info.update(batch_npz=str(bf), source=source, profile=profile.name)
    del model
    return info


def make_grids(info: dict, batch_size: int) -> dict:
    """The statistics round's grid as the server makes it: a scout pass of the client on its batch
    (client.jobs.scout), then server.aggregate.grids_from_scouting with BINS bins."""
    from client.jobs import scout
    from client.profiles import load_profile
    from client.runtime import DeviceRuntime
    from quant.wire import Instruction
    from server.aggregate import grids_from_scouting

    rt = DeviceRuntime(info["bundle"], threads=1)
    data = np.load(info["batch_npz"])["data"]
    reply, _ = scout(rt, Instruction(round=0, job="scout", qparams=rt.qparams), data, batch_size,
                     load_profile(PROFILE))
    grids = grids_from_scouting([reply], BINS)
    return {k: [g.lo, g.hi, g.bins] for k, g in grids.items()}


# ------------------------------------------------------------------------------ workers

def _plain_pass(sess, data, b, out_name="logits"):
    def run():
        for i in range(0, len(data), b):
            sess.run([out_name], {"input_ids": data[i:i + b]})
    return run


def _eval_batch(rt, data, requested, profile) -> int:
    """The batch the client's evaluate job would use (the logits must fit the memory budget)."""
    from client.profiles import plan_batch

    vocab = max(w.shape[0] for w, _ in rt.linears.values())
    return plan_batch(requested, data.shape[1], [vocab], profile, "evaluate")


def worker(kind: str, cfg: dict) -> dict:
    """One measured thing in this fresh process: load, baseline, run twice (cold, warm)."""
    from client.profiles import load_profile

    profile = load_profile(PROFILE)
    data = np.load(cfg["batch_npz"])["data"]
    bs = int(cfg["batch_size"])
    res: dict = {"kind": kind}
    t0 = time.perf_counter()
    if kind == "learn":
        import torch

        from client.learn import learn_ranges
        from client.runtime import qparams_path
        from quant.instrument import quantize_, set_qparams
        from quant.learn_config import LearnConfig
        from quant.qparams import load_qparams
        from quant.wire import Instruction

        torch.set_num_threads(1)
        model, _ = load_torch_model(cfg["quick"])
        quantize_(model, quant_config(profile))
        qp = load_qparams(qparams_path(cfg["bundle"]))
        set_qparams(model, qp)
        keys = [k for k in qp.points if not k.endswith(":weight")]
        ins = Instruction(round=1, job="lsq", qparams=qp, keys=keys)
        lc = LearnConfig(steps=int(cfg["steps"]), batch_size=bs)
        res["load_s"] = time.perf_counter() - t0
        res["points"] = len(keys)
        res["learn_config"] = lc.model_dump()
        job = lambda: learn_ranges(model, qp, ins, data, lc)  # noqa: E731
    elif kind == "plan":
        import torch

        from client.plan import plan_sensitivity
        from client.runtime import qparams_path
        from quant.instrument import quantize_, set_qparams
        from quant.qparams import load_qparams
        from quant.spec import weight_spec
        from quant.wire import Instruction
        from server.rounds import plan_keys

        torch.set_num_threads(1)
        model, _ = load_torch_model(cfg["quick"])
        qc = quant_config(profile)
        quantize_(model, qc)
        qp = load_qparams(qparams_path(cfg["bundle"]))
        set_qparams(model, qp)
        ins = Instruction(round=1, job="plan", qparams=qp, keys=tuple(plan_keys(qp)))
        low_w = weight_spec(4, group_size=64, symmetric=False)      # configs/profiles/mixed.toml's weights
        res["load_s"] = time.perf_counter() - t0
        res["points"] = len(ins.keys)
        job = lambda: plan_sensitivity(model, qp, ins, data, qc.activation, low_w)  # noqa: E731
    elif kind == "float":
        from client.runtime import ort_session

        sess = ort_session(cfg["float_onnx"], threads=1)
        res["load_s"] = res["session_build_s"] = time.perf_counter() - t0
        from client.profiles import plan_batch

        vocab = sess.get_outputs()[0].shape[-1]  # static in our export
        b = plan_batch(bs, data.shape[1], [int(vocab)], profile, "evaluate")
        res["batch_size"] = b
        job = _plain_pass(sess, data, b)
    else:
        from client.runtime import DeviceRuntime, ort_session

        rt = DeviceRuntime(cfg["bundle"], threads=1)
        res["load_s"] = time.perf_counter() - t0
        if kind == "int":
            b = _eval_batch(rt, data, bs, profile)
            res["batch_size"] = b
            job = _plain_pass(rt.session, data, b)
        elif kind == "stats":
            from client.jobs import statistics
            from quant.stats import Grid
            from quant.wire import Instruction

            grids = {k: Grid(*g) for k, g in cfg["grids"].items()}
            widths = rt.activation_widths()
            absmax = {k: widths[k] for k in grids if k.endswith("mlp.down_proj:input")}
            ins = Instruction(round=1, job="stats", qparams=rt.qparams, grids=grids, absmax=absmax)
            t1 = time.perf_counter()  # the capture session: built once, kept between rounds
            rt.capture.session(tuple(sorted({rt.capture.tensors[k] for k in ins.keys})))
            res["capture_build_s"] = time.perf_counter() - t1
            res["points"], res["absmax_points"] = len(grids), len(absmax)
            job = lambda: statistics(rt, ins, data, batch_size=bs, profile=profile)  # noqa: E731
        elif kind == "learn_runtime":
            from client.learn_runtime import learn_ranges_runtime
            from quant.learn_config import LearnConfig
            from quant.wire import Instruction

            keys = tuple(sorted(k for k in rt.qparams.points if not k.endswith(":weight")))
            ins = Instruction(round=1, job="lsq", qparams=rt.qparams, keys=keys)
            lc = LearnConfig(method="runtime", batch_size=bs)
            t1 = time.perf_counter()  # the capture session: the statistics job's, kept between rounds
            rt.capture.session(tuple(sorted({rt.capture.tensors[k] for k in keys})))
            res["capture_build_s"] = time.perf_counter() - t1
            res["points"] = len(keys)
            res["learn_config"] = lc.model_dump()
            job = lambda: learn_ranges_runtime(rt, ins, data, lc, batch_size=bs, profile=profile)  # noqa: E731
        elif kind == "patch":
            from quant.qparams import PointParams

            t1 = time.perf_counter()
            ort_session(rt.model, threads=1)
            res["session_build_s"] = time.perf_counter() - t1

            def job():
                held = rt.qparams
                new = {k: PointParams(p.spec, (p.scale * np.float32(1.1)).astype(np.float32), p.zero_point)
                       for k, p in held.points.items() if not k.endswith(":weight")}
                rt.patch(held.with_points(new, version=int(held.version) + 1))
                return dict(rt.last_patch, points=len(new))
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
    for run in ("cold", "warm"):
        m, out = measure(job)
        res[run] = m
        if kind in ("stats", "learn_runtime"):
            res[run]["job_metrics"] = {k: v for k, v in out[1].items() if isinstance(v, (int, float))}
        elif kind in ("learn", "plan"):
            res[run]["job_metrics"] = {k: v for k, v in out[1].items() if isinstance(v, (int, float))}
        elif kind == "patch":
            res[run]["last_patch"] = out
    return res


# Imported once by the fork server, so that a worker's start costs a fork, not an interpreter and
# torch's import: every worker is still a fresh process (forked from a server that only imported
# these, never from this process, whose heap holds the export and the model).
PRELOAD = ["numpy", "onnx", "onnxruntime", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "client.runtime", "client.jobs", "client.learn",
           "client.learn_runtime", "client.plan", "quant.instrument", "simulation.models"]


def setup(cfg: dict) -> dict:
    """Preparation in a forked child too, so that the parent never imports torch (the server did):
    the cached files and batch, the statistics grid, and the machine and library versions."""
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    info = prepare(Path(cfg["cache"]), cfg["quick"], cfg["sequences"], cfg["seq_len"], log)
    info["grids"] = make_grids(info, cfg["batch_size"])
    info["machine"] = machine()
    return info


def _child(kind: str, cfg: dict, conn) -> None:
    try:
        conn.send(("ok", setup(cfg) if kind == "setup" else worker(kind, cfg)))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
    finally:
        conn.close()


def worker_context():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_worker(ctx, kind: str, cfg: dict, timeout: float) -> dict:
    """``worker(kind, cfg)`` in a fresh process forked by the fork server; its result or an error."""
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(kind, cfg, send), daemon=True)
    p.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise TimeoutError(f"worker {kind} took over {timeout} s")
        status, res = recv.recv()
    except EOFError:
        status, res = "error", "the worker died without a result (killed? out of memory?)"
    finally:
        if p.is_alive():
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    if status != "ok":
        raise RuntimeError(f"worker {kind} failed (exit {p.exitcode}): {res}")
    return res


# ------------------------------------------------------------------------------ report

def _median(xs):
    return float(pystats.median(xs))


def summarize(raw: dict[str, list[dict]]) -> dict:
    """Medians over the reps per kind and the ratios of the jobs to the plain passes."""
    med = {}
    for kind, reps in raw.items():
        m = {f"{run}_{q}": _median([r[run][q] for r in reps]) for run in ("cold", "warm")
             for q in ("wall_s", "peak_mb")}
        m["load_s"] = _median([r["load_s"] for r in reps])
        m["baseline_mb"] = _median([r["cold"]["baseline_mb"] for r in reps])
        for q in ("session_build_s", "capture_build_s"):
            if q in reps[0]:
                m[q] = _median([r[q] for r in reps])
        if kind == "patch":
            for run in ("cold", "warm"):
                for q in ("compute_s", "patch_s", "session_s", "total_s"):
                    m[f"{run}_{q}"] = _median([r[run]["last_patch"][q] for r in reps])
        med[kind] = m
    ratios = {}
    for job in JOBS:
        if job not in med:
            continue
        for base in ("float", "int"):
            ratios[f"{job}_time_vs_{base}"] = med[job]["warm_wall_s"] / med[base]["warm_wall_s"]
            ratios[f"{job}_memory_vs_{base}"] = med[job]["cold_peak_mb"] / med[base]["cold_peak_mb"]
            ratios[f"{job}_cold_time_vs_{base}"] = med[job]["cold_wall_s"] / med[base]["cold_wall_s"]
    if raw.get("learn"):
        steps = raw["learn"][0]["learn_config"]["steps"]
        med["learn"]["steps"] = steps
        med["learn"]["warm_wall_s_per_step"] = med["learn"]["warm_wall_s"] / max(steps, 1)
        ratios["learn_step_time_vs_float"] = med["learn"]["warm_wall_s_per_step"] / med["float"]["warm_wall_s"]
    targets = {k: {"ratio": ratios[k], "at_most": v, "met": bool(ratios[k] <= v)}
               for k, v in TARGETS.items() if k in ratios}
    return {"medians": med, "ratios": ratios, "targets": targets}


def table(result: dict) -> str:
    med, r = result["medians"], result["ratios"]
    rows = [("plain float pass", med["float"], None), ("plain integer pass", med["int"], None),
            ("statistics job", med.get("stats"), "stats"), ("learned-range job (torch)", med.get("learn"), "learn"),
            ("learned-range job (runtime)", med.get("learn_runtime"), "learn_runtime"),
            ("plan job (torch, FIT)", med.get("plan"), "plan")]
    rows = [r for r in rows if r[1] is not None]
    lines = ["| what | warm s | cold s | peak MB (cold) | loaded RSS MB | time / float | time / int | "
             "mem / float | mem / int |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m, j in rows:
        rt = (f"{r[f'{j}_time_vs_float']:.2f} | {r[f'{j}_time_vs_int']:.2f} | "
              f"{r[f'{j}_memory_vs_float']:.2f} | {r[f'{j}_memory_vs_int']:.2f}") if j else "1 | | 1 |"
        lines.append(f"| {name} | {m['warm_wall_s']:.3f} | {m['cold_wall_s']:.3f} | {m['cold_peak_mb']:.1f} | {m['baseline_mb']:.0f} | {rt} |")
    p = med.get("patch")
    if p is None:
        return "\n".join(lines)
    lines.append(f"\npatch (all activation scales x1.1): total {p['cold_total_s']:.3f} s = compute "
                 f"{p['cold_compute_s']:.3f} + initializer patch {p['cold_patch_s']:.3f} + session rebuild "
                 f"{p['cold_session_s']:.3f}; integer session build {p['session_build_s']:.3f} s, float "
                 f"{med['float']['session_build_s']:.3f} s, capture "
                 f"{med.get('stats', med.get('learn_runtime', {})).get('capture_build_s', float('nan')):.3f} s")
    if "learn" in med:
        lines.append(f"learned-range job: {med['learn']['steps']} steps, {med['learn']['warm_wall_s_per_step']:.3f} s/step")
    for k, t in result["targets"].items():
        lines.append(f"target {k} <= {t['at_most']}: {t['ratio']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny Llama, short sequences: seconds")
    ap.add_argument("--reps", type=int, default=None, help="fresh worker processes per kind (default 3; quick 1)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; quick 32)")
    ap.add_argument("--batch-size", type=int, default=8, help="the client's requested batch size")
    ap.add_argument("--steps", type=int, default=8, help="learned-range job steps (LearnConfig default 8)")
    ap.add_argument("--cache", default=None, help="cache of the float ONNX and device bundle "
                    "(default $FEDQUANT_CACHE/bench or ~/.cache/fedquant/bench)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="what to measure (float and int always: the ratios' bases)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    args = ap.parse_args(argv)

    args.kinds = ["float", "int"] + [k for k in KINDS if k in args.kinds and k not in ("float", "int")]
    t_start = time.perf_counter()
    reps = args.reps or (1 if args.quick else 3)
    seq = args.seq_len or (32 if args.quick else 128)
    out = Path(args.out) if args.out else DEFAULT_OUT
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ctx = worker_context()
    info = run_worker(ctx, "setup", {"cache": str(Path(args.cache) if args.cache else cache_dir()),
                                     "quick": args.quick, "sequences": args.sequences, "seq_len": seq,
                                     "batch_size": args.batch_size}, args.timeout)
    cfg = dict(info, quick=args.quick, batch_size=args.batch_size, steps=args.steps)
    load = [os.getloadavg()]
    raw: dict[str, list[dict]] = {k: [] for k in args.kinds}
    for rep in range(reps):
        for kind in args.kinds:
            r = run_worker(ctx, kind, cfg, args.timeout)
            raw[kind].append(r)
            log(f"rep {rep + 1}/{reps} {kind}: warm {r['warm']['wall_s']:.3f} s, cold {r['cold']['wall_s']:.3f} s, "
                f"peak {r['cold']['peak_mb']:.1f} MB over {r['cold']['baseline_mb']:.0f} MB")
        load.append(os.getloadavg())
    stats0 = raw["stats"][0] if raw.get("stats") else None
    learn0 = raw["learn"][0] if raw.get("learn") else None
    rt0 = raw["learn_runtime"][0] if raw.get("learn_runtime") else None
    result = {
        "model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct", "quick": args.quick,
        "machine": dict(info["machine"], load_avg_1_5_15=load),
        "versions": versions(("onnxruntime", "onnx", "numpy", "torch", "transformers", "flwr")),
        "threads": {"onnxruntime": 1, "torch": 1}, "profile": info["profile"],
        "batch": {"sequences": args.sequences, "seq_len": seq, "requested_batch_size": args.batch_size,
                  "float_pass_batch_size": raw["float"][0]["batch_size"],
                  "int_pass_batch_size": raw["int"][0]["batch_size"],
                  "stats_batch_size": stats0 and stats0["cold"]["job_metrics"]["batch_size"],
                  "learn_batch_size": learn0 and learn0["learn_config"]["batch_size"],
                  "learn_runtime_batch_size": rt0 and rt0["cold"]["job_metrics"]["batch_size"], **info["source"]},
        "kinds": list(args.kinds),
        "statistics_instruction": stats0 and {"bins": BINS, "points": stats0["points"], "absmax_points": stats0["absmax_points"],
                                   "grid": "client.jobs.scout on the batch -> server.aggregate.grids_from_scouting"},
        "learn_config": learn0 and learn0["learn_config"], "learn_points": learn0 and learn0["points"],
        "learn_runtime_config": rt0 and rt0["learn_config"], "learn_runtime_points": rt0 and rt0["points"],
        "plan_points": raw["plan"][0]["points"] if raw.get("plan") else None,
        "reps": reps, "memory_probe": raw["float"][0]["cold"]["probe"],
        "definitions": {"time": "warm: second run in the worker (runtime and sessions loaded, as a client "
                                "keeping them between rounds)",
                        "memory": "cold: peak RSS over the RSS after loading, during the first run "
                                  "(includes ORT's arena growing to the job's working set)",
                        "learn_per_step": "the learned-range job's wall time / steps; the total also "
                                          "holds its two no-grad loss evaluations (before, after)"},
        "cache": {**{k: shown_path(info[k]) for k in ("dir", "float_onnx", "bundle")},
                  **{k: info[k] for k in ("float_export_s", "bundle_export_s")}},
        "raw": raw, **summarize(raw),
    }
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out, result)
    print(table(result))
    log(f"wrote {out} in {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()

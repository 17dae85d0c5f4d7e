"""Peak memory and time per stage of a whole run on models of real size (issue 19, goal 6).

For each model it runs ``fedquant simulate`` of ``configs/large.toml`` (the model swapped in; the
Qwen2.5 configs of ``simulation.models.QWEN2_CONFIGS`` have random weights, so nothing downloads)
in a child process, and samples the memory of the child's whole process tree (the server, Ray's
processes, the client actors) every 0.25 s: the sum of RSS (shared pages counted once per
process: an upper bound) and of PSS (shared pages split between processes: what the tree costs
the machine). Each sample is charged to the stage the run reported last (its progress
messages), so the JSON says which stage peaks and how long each takes; the processes at the peak
tell where the memory is. Run it alone on the machine (it kills its run past ``--limit-gb``):

    .venv/bin/python -m bench.large_models --models qwen2.5-0.5b-random r1-distill-qwen-1.5b-random

Results merge into ``bench/results/large_models.json`` (keyed by model), with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, quiet_env, write_json

GB = 1e9


# ------------------------------------------------------------------------------ process tree memory

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray::", "default_worker",
                "bench.large_models --child", "flwr"):
        if key in cmd:
            return key.strip()
    return " ".join(Path(a).name for a in cmd.split()[:3])  # no machine paths in the results


def sample(pid: int) -> dict:
    """RSS and PSS (bytes) of the tree of ``pid``, and per process."""
    procs = []
    for p in tree(pid):
        rss = _kb(f"/proc/{p}/status", "VmRSS:") * 1024
        pss = _kb(f"/proc/{p}/smaps_rollup", "Pss:") * 1024
        if rss:
            procs.append((p, rss, pss))
    return {"rss": sum(r for _, r, _ in procs), "pss": sum(s for _, _, s in procs), "procs": procs}


def named(procs) -> list[tuple[str, int, int]]:
    """``(kind of process, rss, pss)`` of sampled processes (read while they are alive)."""
    return [(_name(p), rss, pss) for p, rss, pss in procs]


def by_kind(procs) -> dict[str, list[float]]:
    """GB of PSS per process, grouped by the kind of process (``named``'s first field)."""
    out: dict[str, list] = {}
    for kind, _rss, pss in procs:
        out.setdefault(kind, []).append(round(pss / GB, 2))
    return out


# ------------------------------------------------------------------------------ the child: one run

def child(config: Path, out: Path, model: str) -> None:
    """Run ``simulate`` on ``config`` with ``model``, printing each progress message as a stage."""
    from simulation.prepare import load_simulation_config
    from simulation.simulate import simulate

    cfg = load_simulation_config(config)
    cfg = type(cfg).model_validate({**cfg.model_dump(), "model": model, "name": "large-" + model})

    def stage(msg: str) -> None:
        print(f"@stage {msg}", flush=True)

    def on_round(m: dict) -> None:
        stage(f"round {m['round']} {m['job']} done")

    stage("start")
    summary = simulate(cfg, out, progress=stage, on_round=on_round)
    stage("end")
    print("@summary " + json.dumps({p: {k: s.get(k) for k in ("float_ppl", "random_calib_ppl", "federated_ppl")}
                                   for p, s in summary["profiles"].items()}), flush=True)


# ------------------------------------------------------------------------------ the parent: measure

def stage_key(msg: str) -> str:
    """A progress message without its numbers' detail, as a stage name."""
    return msg.split(" (")[0][:80]


def mem_available() -> int:
    return _kb("/proc/meminfo", "MemAvailable:") * 1024


def measure(model: str, config: Path, out: Path, interval: float = 0.25, limit_gb: float = 21.0) -> dict:
    """Run the child on ``model`` and return its stages, peaks and the processes at the peak.
    The child's process group is killed when the tree passes ``limit_gb`` (PSS) or the machine
    has less than 1 GB available: the machine is shared, and the OOM killer chooses no sides."""
    from simulation.memory import model_size
    from simulation.prepare import check_run_fits, load_simulation_config

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDQUANT_MEMORY_CHECK="off")  # measure past the estimate
    proc = subprocess.Popen([sys.executable, "-m", "bench.large_models", "--child", str(config), str(out), model],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    killed = None
    t0 = time.perf_counter()
    stages: list[dict] = []
    lock = threading.Lock()
    summary: dict = {}
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            with lock:
                if line.startswith("@stage "):
                    stages.append({"stage": stage_key(line[7:]), "start_s": time.perf_counter() - t0,
                                   "peak_rss": 0, "peak_pss": 0})
                elif line.startswith("@summary "):
                    summary.update(json.loads(line[9:]))
                else:
                    tail.append(line)
                    del tail[:-40]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = {"rss": 0, "pss": 0, "procs": [], "stage": None, "at_s": 0.0}
    while proc.poll() is None:
        s = sample(proc.pid)
        with lock:
            cur = stages[-1] if stages else None
            if cur is not None:
                cur["peak_rss"] = max(cur["peak_rss"], s["rss"])
                if s["pss"] > cur["peak_pss"]:
                    cur["peak_pss"], cur["procs"] = s["pss"], named(s["procs"])
        if s["pss"] > peak["pss"]:
            peak = {**s, "procs": named(s["procs"]), "stage": cur["stage"] if cur else None,
                    "at_s": time.perf_counter() - t0}
        if killed is None and (s["pss"] > limit_gb * GB or mem_available() < 1 * GB):
            killed = (f"killed by the bench at {s['pss'] / GB:.1f} GB PSS (limit {limit_gb} GB), "
                      f"machine available {mem_available() / GB:.1f} GB, stage {cur['stage'] if cur else None}")
            os.killpg(proc.pid, 9)
        time.sleep(interval)
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    for a, b in zip(stages, stages[1:] + [{"start_s": wall}]):
        a["wall_s"] = round(b["start_s"] - a["start_s"], 1)
        a["start_s"] = round(a["start_s"], 1)
        a["peak_rss_gb"] = round(a.pop("peak_rss") / GB, 2)
        a["peak_pss_gb"] = round(a.pop("peak_pss") / GB, 2)
        a["processes_at_peak_pss_gb"] = by_kind(a.pop("procs", []))
    size = model_size(model)
    params = size.params
    cfg = load_simulation_config(config)
    cfg = type(cfg).model_validate({**cfg.model_dump(), "model": model})
    est = check_run_fits(cfg, memory=10**15)     # the estimate the run's own check makes
    res = {"model": model, "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
           "params": params, "returncode": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_gb": round(max([st["peak_rss_gb"] for st in stages] or [0]), 2),
           "peak_pss_gb": round(peak["pss"] / GB, 2), "peak_stage": peak["stage"],
           "peak_pss_gb_per_billion_params": round(peak["pss"] / GB / (params / 1e9), 2) if params else None,
           "processes_at_peak_pss_gb": by_kind(peak["procs"]), "stages": stages, "disk_gb": disk_gb(out),
           "summary": summary, "killed": killed, "vocab": size.vocab, "tied": size.tied,
           "estimate_gb": {k: round(v / GB, 2) for k, v in est.items()}}
    if proc.returncode != 0:
        print("\n".join(tail), file=sys.stderr)   # the log, not the results (machine paths)
    return res


def disk_gb(path: Path) -> float:
    """Bytes a run directory takes, each hard-linked file counted once."""
    seen, total = set(), 0
    for f in path.rglob("*") if path.exists() else []:
        if f.is_file():
            st = f.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return round(total / GB, 2)


def table(doc: dict) -> str:
    """The README's table of a results file: one row per run, the stage that peaked."""
    rows = ["| model | parameters | peak, process tree (PSS) | per billion parameters | stage at the peak | "
            "wall | run directory on disk |", "|---|---|---|---|---|---|---|"]
    for key, r in sorted(doc["models"].items(), key=lambda kv: kv[1]["params"]):
        peak = f"{r['peak_pss_gb']:.1f} GB" + (" (killed by the bench)" if r.get("killed") else "")
        rows.append(f"| {key} | {r['params'] / 1e9:.2f}B | {peak} | {r['peak_pss_gb_per_billion_params']:.1f} GB | "
                    f"{r['peak_stage']} | {r['wall_s'] / 60:.1f} min | {r['disk_gb']:.1f} GB |")
    return "\n".join(rows)


def stage_table(doc: dict, key: str, before: dict | None = None) -> str:
    """Peak memory of the process tree (PSS) and wall time per stage of one run of a results
    file (README "Large models"), beside the same stage of the same run in ``before`` when given.
    A stage runs from its progress message to the next one: "round N job done" is round N+1."""
    def stages(d):
        return {st["stage"]: st for st in reversed(d["models"][key]["stages"])} if d else {}
    old = stages(before)
    rows = [f"| stage of {key} | " + ("before | " if before else "") + "peak (PSS) | wall |",
            "|---|" + ("---|" if before else "") + "---|---|"]
    for st in doc["models"][key]["stages"]:
        was = old.get(st["stage"])
        prev = (f"{was['peak_pss_gb']:.2f} GB | " if was else "- | ") if before else ""
        rows.append(f"| {st['stage']} | {prev}{st['peak_pss_gb']:.2f} GB | {st['wall_s']:.0f} s |")
    return "\n".join(rows)


def main(argv=None) -> None:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "OUT", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-0.5b-random"],
                    help="MODEL (with --config) or MODEL@CONFIG, e.g. smollm2@configs/default.toml")
    ap.add_argument("--limit-gb", type=float, default=21.0, help="kill a run whose tree passes this (PSS)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "large.toml")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "large")
    ap.add_argument("--out", type=Path, default=RESULTS / "large_models.json")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--table", action="store_true", help="print the README table of --out and stop")
    ap.add_argument("--stages", metavar="MODEL@CONFIG", help="with --table: that run's table of stages instead")
    ap.add_argument("--before", type=Path, help="with --stages: a results file whose same run goes beside it")
    args = ap.parse_args(argv)
    if args.table:
        doc = json.loads(args.out.read_text())
        before = json.loads(args.before.read_text()) if args.before else None
        return print(stage_table(doc, args.stages, before) if args.stages else table(doc))
    if args.child:
        config, out, model = args.child
        return child(Path(config), Path(out), model)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    for entry in args.models:
        model, _, config = entry.partition("@")
        config = (ROOT / config if config else args.config).resolve()
        key = f"{model}@{config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"
        print(f"{model}: running {config.name}", flush=True)
        res = measure(model, config, args.work / model, limit_gb=args.limit_gb)
        print(json.dumps(res, indent=1), flush=True)
        doc["models"][key] = res
        doc["machine"] = machine()
        doc["command"] = ".venv/bin/python -m bench.large_models --models " \
                         + " ".join(sorted(doc["models"]))
        doc["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=ROOT).stdout.strip()
        doc["memory_gb"] = round(_kb("/proc/meminfo", "MemTotal:") * 1024 / GB, 1)
        write_json(args.out, doc)
        if not args.keep:
            shutil.rmtree(args.work / model, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`fedquant simulate`: a fleet on one machine, on Flower's simulation engine (design.md s. 8, 10).

What it does, in order:

1. **prepare** (``prepare``): load the model, build the fleet (``simulation.fleet``), export the float
   ONNX graph once (cached for the shipped SmolLM2), make each profile's *starting* QParams with the
   common recipe (calibration on random token ids: what a server without data does), and write the
   device directory every client loads (``client.device``). A second start of the same run reuses
   all of it, so a resumed run starts from the very same place.
2. **run**: a Flower ``ServerApp`` whose main is ``server.app.run_server`` (schedule, validation,
   aggregation, checkpoint and resume) and the ``ClientApp`` of ``client.app``, on Flower's Ray
   backend; the server evaluates each profile's QParams on held-out roles with the ONNX Runtime
   integer model after every evaluation round.
3. **report**: the references (float, random-token calibration, centralized calibration on the
   pooled training data with the same grids and calibrator), ``summary.json``, the final QParams,
   QDQ ONNX model and AIMET/QNN encodings per profile, and plots.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from quant.qparams import QParams, atomic_write_bytes, load_qparams, save_qparams
from simulation.config import SimulationConfig, quant_config_for

RUN_FORMAT = "fedquant.run/1"


@dataclass
class Prepared:
    cfg: SimulationConfig
    out: Path
    device_dir: Path
    float_onnx: Path
    initial: dict[str, QParams]
    evals: np.ndarray
    clients: list = field(default_factory=list)
    about: dict = field(default_factory=dict)
    prepare_s: float = 0.0


def _say(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def config_digest(cfg: SimulationConfig) -> str:
    """What must not change for a run directory to be reused: everything but the engine (how many
    CPUs does not change a result) and the schedule, which the server's checkpoint digest checks
    itself (``server.config.ServerConfig.digest``: a run resumes only under the same schedule)."""
    d = cfg.model_dump(mode="json")
    d.pop("engine", None)
    d.pop("name", None)         # a label
    d.get("server", {}).pop("schedule", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def seed_run_dir(cfg: SimulationConfig, out: Path, source: Path) -> None:
    """Start run directory ``out`` from what ``source`` prepared (starting QParams, device
    directory, references; hard links where the filesystem allows): only for the same config
    digest, i.e. the same model, data, fleet and server recipe -- a schedule may differ. An ``out``
    that already has a run is left alone (it resumes)."""
    if (out / "run.json").is_file():
        return
    held = json.loads((source / "run.json").read_text()) if (source / "run.json").is_file() else {}
    if held.get("config_digest") != config_digest(cfg):
        raise ValueError(f"--prepared-from {source}: it was prepared for another config (digest "
                         f"{held.get('config_digest')}, this one {config_digest(cfg)})")
    if not (source / "device" / "fleet.json").is_file():
        raise ValueError(f"--prepared-from {source}: no prepared device directory in it")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in ("initial", "device"):
        shutil.copytree(source / name, tmp / name, copy_function=link)
    for name in ("references.json", "run.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    if out.exists():
        if any(out.iterdir()):
            shutil.rmtree(tmp)
            raise ValueError(f"--prepared-from: {out} exists and is not empty")
        out.rmdir()
    os.replace(tmp, out)


def _float_onnx(model, cfg: SimulationConfig, out: Path, progress) -> Path:
    """The float graph: cached across runs under ~/.cache/fedquant/onnx for the shipped SmolLM2
    (exporting it takes minutes), exported into the run for anything else."""
    from quant.export import export_float_onnx
    from quant.instrument import fingerprint

    if cfg.model == "smollm2":
        import torch

        from simulation.models import SMOLLM2_SHA256

        key = hashlib.sha256(f"{SMOLLM2_SHA256}|{fingerprint(model)}|{torch.__version__}".encode()).hexdigest()[:12]
        root = Path(os.environ.get("FEDQUANT_CACHE", Path.home() / ".cache" / "fedquant")) / "onnx"
        final = root / f"smollm2-{key}"
    else:
        final = out / "float"
    path = final / "float.onnx"
    if path.is_file():
        return path
    _say(progress, f"exporting the float ONNX graph of {cfg.model} (SmolLM2: a few minutes, once)")
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_float_onnx(model, tmp / "float.onnx")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)          # a killed export leaves a .tmp directory, never a half graph
    return path


def random_calibration(model, qcfg, cfg: SimulationConfig, vocab: int, name: str = "") -> QParams:
    """The starting QParams of profile ``name``: weights min-max per channel/group, activations
    calibrated (the server's calibrator for the profile, and bins) on random token ids -- the
    common ``representative_dataset`` recipe, and the reference row ``random_calib_ppl``."""
    import torch

    from quant.instrument import fingerprint, get_qparams, quantize_, set_mode, set_qparams
    from quant.ptq import activation_qparams, activation_specs, collect_stats, grids_for, scout_ranges
    from simulation.sequences import random_token_sequences

    m = copy.deepcopy(model)
    quantize_(m, qcfg)
    set_mode(m, "float", "activations")
    ids = random_token_sequences(vocab, cfg.data.random_sequences, cfg.data.seq_len, cfg.data.seed)
    batches = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    with torch.no_grad():
        grids = grids_for(scout_ranges(m, batches), cfg.server.bins)
        stats = collect_stats(m, batches, grids)
    points = activation_qparams(stats, activation_specs(m), cfg.server.calibrator_for(name))
    set_qparams(m, QParams(points, model=fingerprint(m)))
    qp = get_qparams(m)
    return QParams(qp.points, qp.model, 0, qp.smoothing, {"recipe": "random-token calibration"})


def with_unit_smoothing(qp: QParams, model) -> QParams:
    """``qp`` with factors 1 on every Linear that has an input point: the exported model then has
    the Div node each Linear's SmoothQuant factors go into (x / 1 is x, bit for bit), so the
    factors a run learns are a patch of initializers, not a new graph."""
    from quant.export import float_linears

    ones = {p: np.ones(w.shape[1], np.float32) for p, (w, _) in float_linears(model).items()
            if f"{p}:input" in qp.points}
    return QParams(qp.points, qp.model, qp.version, {**ones, **qp.smoothing}, qp.meta)


def server_weights(prep: "Prepared") -> dict[str, np.ndarray]:
    """Linear path -> float weight (out, in), as the devices hold them (the device directory's
    ``model.weights.npz``): the server computes smoothing factors and weight points from these."""
    from client.runtime import load_float_linears, weights_path

    name = next(iter(prep.initial))
    return {p: w for p, (w, _) in load_float_linears(weights_path(prep.device_dir / name / "model.onnx")).items()}


def prepare(cfg: SimulationConfig, out: Path, progress: Callable[[str], None] | None = None) -> Prepared:
    """Everything the federation starts from (see the module docstring), reused when present."""
    import torch

    from client.device import write_device_dir
    from simulation.fleet import build_fleet
    from simulation.models import load_model

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_dir(cfg, out)
    _say(progress, f"loading {cfg.model}")
    model, tokenizer = load_model(cfg.model)
    model.eval()
    profiles = {e.load().name: (e.load(), e) for e in cfg.fleet}
    clients, evals, about = build_fleet(cfg.data, tokenizer, [(n, e.share) for n, (_, e) in profiles.items()])
    float_onnx = _float_onnx(model, cfg, out, progress)
    device_dir = out / "device"
    init_dir = out / "initial"
    initial: dict[str, QParams] = {}
    qcfgs = {n: quant_config_for(p, e) for n, (p, e) in profiles.items()}
    for name in profiles:
        f = init_dir / f"{name}.safetensors"
        if f.is_file():
            initial[name] = load_qparams(f)
        else:
            _say(progress, f"{name}: calibrating the starting ranges on random token ids")
            initial[name] = random_calibration(model, qcfgs[name], cfg, model.config.vocab_size, name)
            if cfg.server.smoothing is not None and cfg.server.smoothing.alpha_for(name) is not None:
                initial[name] = with_unit_smoothing(initial[name], model)
            save_qparams(initial[name], f)
    if not (device_dir / "fleet.json").is_file():
        _say(progress, "writing the device directory (a QDQ model per profile, the clients' data)")
        nodes = {str(c.pid): {"profile": c.profile, "train": c.train, "test": c.test, "client-id": c.client_id}
                 for c in clients}
        write_device_dir(device_dir, model=model, profiles={n: p for n, (p, _) in profiles.items()},
                         quant_configs=qcfgs, qparams=initial, float_onnx=float_onnx, nodes=nodes)
    return Prepared(cfg, out, device_dir, float_onnx, initial, evals, clients, about,
                    time.perf_counter() - t0)


def _check_run_dir(cfg: SimulationConfig, out: Path) -> None:
    """A run directory holds one config: resuming with another would mix two experiments."""
    meta = out / "run.json"
    digest = config_digest(cfg)
    if meta.is_file():
        held = json.loads(meta.read_text())
        if held.get("config_digest") != digest:
            raise ValueError(f"{out} holds a run of another config (digest {held.get('config_digest')}, "
                             f"this one {digest}): choose another --out or delete it")
        return
    doc = {"format": RUN_FORMAT, "config_digest": digest, "config": cfg.model_dump(mode="json")}
    atomic_write_bytes(meta, json.dumps(doc, indent=1).encode())


# --------------------------------------------------------------------------------- evaluation

class ServerEval:
    """Server-side evaluation on the held-out roles with each profile's ONNX Runtime integer
    model (a ``client.runtime.DeviceRuntime`` of the device directory, patched to the QParams)."""

    def __init__(self, device_dir: Path, evals: np.ndarray, threads: int, batch_size: int = 8):
        self.device_dir, self.evals, self.threads, self.batch_size = device_dir, evals, threads, batch_size
        self.runtimes: dict = {}

    def runtime(self, profile: str):
        from client.runtime import DeviceRuntime

        if profile not in self.runtimes:
            self.runtimes[profile] = DeviceRuntime(self.device_dir / profile / "model.onnx", threads=self.threads)
        return self.runtimes[profile]

    def __call__(self, profile: str, qparams: QParams) -> dict:
        rt = self.runtime(profile)
        if int(qparams.version) < int(rt.qparams.version):   # a reference evaluated after the run
            qparams = QParams(qparams.points, qparams.model, rt.qparams.version, qparams.smoothing, qparams.meta)
        rt.patch(qparams)
        nll, tokens = rt.evaluate(self.evals, batch_size=self.batch_size)
        return {"perplexity": float(np.exp(nll / tokens)), "nll_sum": float(nll), "tokens": int(tokens)}


def float_perplexity(float_onnx: Path, evals: np.ndarray, threads: int, batch_size: int = 8) -> float:
    from client.runtime import ort_session
    from quant.metrics import nll_sum_and_count

    sess = ort_session(float_onnx, threads=threads)
    total, count = 0.0, 0
    for i in range(0, len(evals), batch_size):
        ids = evals[i:i + batch_size]
        s, c = nll_sum_and_count(sess.run(["logits"], {"input_ids": ids})[0], ids)
        total, count = total + s, count + c
    return float(np.exp(total / count))


def centralized_qparams(prep: Prepared) -> dict[str, QParams]:
    """What a data-collecting server would get: the same recipe (scouting, smoothing if the config
    has it, grids, statistics, calibrator) on the pooled training data of every client (a smoothed
    input: of the clients whose profile has that smoothing, as in the federation). Each step
    runs client by client with the clients' own job functions (the float activations are the same
    numbers) and is merged with the server's functions: merges are exact, so this equals one pass
    over the pooled data, and a federation whose rounds reach every client gives the same bits."""
    from client.jobs import scout, statistics
    from client.runtime import DeviceRuntime
    from quant.wire import Instruction
    from server.aggregate import grids_from_scouting, ranges_for_profile, sum_statistics
    from server.rounds import (activation_keys, smoothable_paths, smoothed_qparams, smoothed_scouting,
                               smoothing_from_scouting, smoothing_groups)

    scfg, bs = prep.cfg.server, prep.cfg.server.batch_size
    weights = server_weights(prep) if scfg.smoothing is not None else {}
    groups = smoothing_groups(prep.initial, scfg)
    plain = [p for p in sorted(prep.initial) if not any(p in g for g in groups.values())]
    first = next(iter(sorted(prep.initial)))
    rt = DeviceRuntime(prep.device_dir / first / "model.onnx", threads=prep.cfg.threads)
    held = prep.initial[first]
    ins = Instruction(round=0, job="scout", qparams=held, keys=tuple(activation_keys(held)),
                      absmax={f"{p}:input": int(weights[p].shape[1])
                              for p in smoothable_paths(prep.initial, scfg, weights)})
    scouting = [scout(rt, ins, c.train, batch_size=bs)[0] for c in prep.clients]

    def pooled(profiles, initial, replies) -> dict[str, QParams]:
        """Grids, statistics of every client and calibration for profiles sharing a smoothing."""
        rt = DeviceRuntime(prep.device_dir / profiles[0] / "model.onnx", threads=prep.cfg.threads)
        rt.patch(initial[profiles[0]])
        grids = grids_from_scouting(replies, scfg.bins, scfg.grid_margin, scfg.grid_quantile)
        qp0 = initial[profiles[0]]
        keys = tuple(k for k in sorted(grids) if k in rt.capture.tensors and k in qp0.points)
        sins = Instruction(round=0, job="stats", qparams=qp0, keys=keys, grids={k: grids[k] for k in keys})
        own = {k for k in keys if k.endswith(":input") and k.rsplit(":", 1)[0] in qp0.smoothing
               and any(scfg.smoothing and scfg.smoothing.alpha_for(p) is not None for p in profiles)}
        # a smoothed input's histograms come from the clients holding its factors (the federation
        # cannot have others'); every other point pools every client, as the federation does
        merged = sum_statistics([{k: v for k, v in statistics(rt, sins, c.train, batch_size=bs)[0].stats.items()
                                  if k not in own or c.profile in profiles} for c in prep.clients])
        out = {}
        for p in profiles:
            qp = initial[p]
            specs = {k: qp.points[k].spec for k in activation_keys(qp) if k in merged and merged[k].n > 0}
            points = ranges_for_profile(merged, specs, scfg.calibrator_for(p))
            out[p] = QParams({**qp.points, **points}, qp.model, qp.version, qp.smoothing,
                             {**qp.meta, "recipe": "centralized calibration, pooled training data"})
        return out

    out = pooled(plain, prep.initial, scouting) if plain else {}
    for alpha, profiles in groups.items():
        group = {p: prep.initial[p] for p in profiles}
        factors = smoothing_from_scouting(scouting, smoothable_paths(group, scfg, weights), weights, alpha, scfg)
        smoothed = [smoothed_scouting(r, factors) for r in scouting]
        initial = {p: smoothed_qparams(qp, factors, weights, smoothed) for p, qp in group.items()}
        out |= pooled(profiles, initial, smoothed)
    return out


# --------------------------------------------------------------------------------- the run

def _uniform(*key) -> float:
    """A deterministic draw in [0, 1) from ``key`` (sha256: the same in every process and run)."""
    h = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class Unreliable:
    """Simulated unreliable devices (the fleet entries' ``availability`` and ``dropout``): for each
    partition id, a device is offline in a round with probability ``1 - availability`` and drops out
    of a job it started with probability ``dropout``. Flower's simulation engine keeps every node
    connected, so a lost device answers with an error record (``unavailable`` / ``dropout``) instead
    of keeping the round waiting for its timeout; the server counts it like any lost reply. Draws
    depend only on (seed, partition id, round): a resumed run loses the same devices."""

    rates: dict[str, tuple[float, float]]
    seed: int

    def __call__(self, message_type: str, content, node_config):
        if message_type == "query":
            return None
        from client.app import error_reply

        pid = str(node_config.get("partition-id"))
        availability, dropout = self.rates.get(pid, (1.0, 0.0))
        try:
            rnd = json.loads(content["config"]["header"])["round"]
        except Exception:       # not an instruction: let the device answer it
            return None
        if _uniform(self.seed, "availability", pid, rnd) >= availability:
            return error_reply("unavailable", f"simulated: device {pid} is offline in round {rnd}")
        if _uniform(self.seed, "dropout", pid, rnd) < dropout:
            return error_reply("dropout", f"simulated: device {pid} dropped out of round {rnd}")
        return None


def unreliable_for(prep: "Prepared") -> Unreliable | None:
    by_profile = {e.load().name: (e.availability, e.dropout) for e in prep.cfg.fleet}
    rates = {str(c.pid): by_profile[c.profile] for c in prep.clients if by_profile[c.profile] != (1.0, 0.0)}
    return Unreliable(rates, prep.cfg.data.seed) if rates else None


def backend_config(cfg: SimulationConfig) -> dict:
    return {"client_resources": {"num_cpus": cfg.engine.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": cfg.engine.num_cpus, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "ERROR", "log_to_driver": False}}


def run_federation(prep: Prepared, evaluate_fn, on_round=None) -> dict[str, QParams]:
    """The federation itself on Flower's simulation engine: our ServerApp around
    ``server.app.run_server`` and ``client.app``'s ClientApp, one SuperNode per client."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import make_app
    from server.app import run_server

    result: dict = {}
    server_app = ServerApp()

    def round_done(metrics: dict) -> None:
        record_scales(prep.out, metrics["round"])
        if on_round is not None:
            on_round(metrics)

    @server_app.main()
    def _main(grid, context) -> None:
        result["qparams"] = run_server(grid, prep.cfg.server, prep.initial, prep.out,
                                       evaluate_fn=evaluate_fn, on_round=round_done,
                                       weights=server_weights(prep) if prep.cfg.server.smoothing else None)

    client_app = make_app({"device-dir": str(prep.device_dir.resolve())}, intercept=unreliable_for(prep))
    _quiet_flower()
    run_simulation(server_app, client_app, num_supernodes=len(prep.clients),
                   backend_config=backend_config(prep.cfg))
    if "qparams" not in result:
        raise RuntimeError("the federation ended without a result (see the log above)")
    return result["qparams"]


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


def _quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def simulate(cfg: SimulationConfig, out: Path, progress: Callable[[str], None] | None = None,
             on_round: Callable[[dict], None] | None = None) -> dict:
    """Prepare, run and report (module docstring); returns the summary also written to
    ``out/summary.json``."""
    t0 = time.perf_counter()
    prep = prepare(cfg, out, progress)
    ev = ServerEval(prep.device_dir, prep.evals, cfg.threads, cfg.server.batch_size)
    refs = _references(prep, ev, progress)
    _say(progress, f"federating: {len(prep.clients)} clients, {len(cfg.server.schedule)} schedule entries")
    final = run_federation(prep, ev, on_round)
    return report(prep, ev, refs, final, progress, time.perf_counter() - t0)


def report(prep: Prepared, ev: "ServerEval", refs: dict, final: dict[str, QParams], progress=None,
           wall_s: float | None = None) -> dict:
    """After the federation: the artifacts, the centralized reference, summary.json and plots."""
    from server.state import load_checkpoint
    from simulation.plots import plot_run

    _say(progress, "writing the final QParams, QDQ models and encodings")
    artifacts = write_artifacts(prep, ev, final)
    _say(progress, "centralized reference: the same calibrator on the pooled training data")
    state = load_checkpoint(prep.out / "checkpoint.safetensors")
    if state.grids:         # the run scouted: compare it with the same recipe on pooled data
        central = centralized_qparams(prep)
        for p, qp in central.items():
            save_qparams(qp, prep.out / "qparams" / f"{p}.centralized.safetensors")
            refs[p]["centralized_ppl"] = ev(p, qp)["perplexity"]
    summary = summarise(prep, refs, artifacts, wall_s if wall_s is not None else prep.prepare_s)
    summary["plots"] = plot_run(prep.out, summary)
    atomic_write_bytes(prep.out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _references(prep: Prepared, ev: ServerEval, progress) -> dict[str, dict]:
    """Float and random-token-calibration perplexity per profile, cached in the run directory."""
    f = prep.out / "references.json"
    if f.is_file():
        return json.loads(f.read_text())
    _say(progress, "references: float and random-token calibration perplexity")
    fl = float_perplexity(prep.float_onnx, prep.evals, prep.cfg.threads, prep.cfg.server.batch_size)
    refs = {p: {"float_ppl": fl, "random_calib_ppl": ev(p, qp)["perplexity"]} for p, qp in prep.initial.items()}
    atomic_write_bytes(f, json.dumps(refs, indent=1).encode())
    return refs


def write_artifacts(prep: Prepared, ev: ServerEval, final: dict[str, QParams]) -> dict[str, dict]:
    """Per profile: the final QParams (safetensors), the QDQ ONNX model the evaluation ran (with its
    name map) and encodings JSON in the AIMET/QNN style (design.md section 8)."""
    import onnx

    from quant.export import names_path, onnx_encoding_names, write_encodings_json

    names = onnx_encoding_names(onnx.load(str(prep.float_onnx), load_external_data=False))
    out = {}
    for p, qp in final.items():
        d = prep.out / "export" / p
        d.mkdir(parents=True, exist_ok=True)
        rt = ev.runtime(p)
        rt.patch(qp)
        tmp = d / f".model.onnx.tmp{os.getpid()}"
        onnx.save(rt.model, str(tmp))
        os.replace(tmp, d / "model.onnx")
        shutil.copyfile(names_path(rt.path), names_path(d / "model.onnx"))
        save_qparams(qp, prep.out / "qparams" / f"{p}.safetensors")
        write_encodings_json(qp, d / "encodings.json", names=names)
        out[p] = {"qparams": str(prep.out / "qparams" / f"{p}.safetensors"), "onnx": str(d / "model.onnx"),
                  "encodings": str(d / "encodings.json"), "version": int(qp.version)}
    return out


def read_metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def summarise(prep: Prepared, refs: dict, artifacts: dict, wall_s: float) -> dict:
    """summary.json (issue: per profile float/random/centralized/federated perplexity, bytes per
    client per round, clients, rounds, wall time)."""
    from simulation.quality import machine_info

    lines = read_metrics(prep.out)
    profiles = {}
    for p in prep.initial:
        fed, up, down = [], [], []
        for m in lines:
            ev = (m.get("server_eval") or {}).get(p)
            if ev is not None:
                fed.append(ev["perplexity"] if isinstance(ev, dict) else ev)
            b = (m.get("bytes") or {}).get(p) or {}
            if b.get("up_per_client"):
                up.append({"round": m["round"], "job": m["job"], "bytes": b["up_per_client"]})
            if b.get("down_per_client"):
                down.append({"round": m["round"], "job": m["job"], "bytes": b["down_per_client"]})
        r = refs.get(p, {})
        profiles[p] = {"float_ppl": r.get("float_ppl"), "random_calib_ppl": r.get("random_calib_ppl"),
                       "centralized_ppl": r.get("centralized_ppl"), "federated_ppl": fed,
                       "bytes_up_per_client_round": up, "bytes_down_per_client_round": down,
                       "clients": sum(1 for c in prep.clients if c.profile == p),
                       "artifacts": artifacts.get(p, {})}
    return {"format": RUN_FORMAT, "name": prep.cfg.name, "model": prep.cfg.model, "profiles": profiles,
            "clients": len(prep.clients), "rounds": len(lines), "data": prep.about,
            "wall_s": round(wall_s, 1), "prepare_s": round(prep.prepare_s, 1), "machine": machine_info()}


def load_simulation_config(path, rounds: int | None = None, clients: int | None = None) -> SimulationConfig:
    """The TOML file as a SimulationConfig (errors name the key and the file), with the command
    line's ``--clients`` and ``--rounds`` (the first N rounds of the schedule) applied."""
    from quant.configfile import load_config

    cfg = load_config(path, SimulationConfig, {"data.clients": clients})
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {rounds}")
        kept, left = [], rounds
        for e in cfg.server.schedule:
            if left <= 0:
                break
            kept.append(e.model_copy(update={"repeat": min(e.repeat, left)}))
            left -= kept[-1].repeat
        server = cfg.server.model_dump()
        server["schedule"] = [k.model_dump() for k in kept]
        cfg = SimulationConfig.model_validate({**cfg.model_dump(), "server": server})
    return cfg

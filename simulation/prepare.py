"""Everything a run starts from (design.md sections 8 and 11), made once and reused.

``prepare`` loads the model, builds the fleet (``simulation.fleet``), exports the float ONNX graph
once (cached for the shipped SmolLM2), makes each profile's *starting* QParams with the common
recipe (calibration on random token ids: what a server without data does), and writes the device
directory every client loads (``client.device``). A second start of the same run reuses all of it,
so a resumed run starts from the very same place; ``run.json`` holds the config digest, and another
config refuses to reuse the directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from client.device import FLOAT_ONNX
from client.runtime import release_memory
from quant.qparams import QParams, atomic_write_bytes, load_qparams, per_token_linears, save_qparams
from server.config import OPERATIONAL
from simulation.config import SimulationConfig, quant_config_for

RUN_FORMAT = "fedquant.run/1"


@dataclass
class Prepared:
    """A prepared run: its config and directory, the device directory, the float graph, each
    profile's starting QParams, the held-out evaluation sequences and the fleet's clients."""

    cfg: SimulationConfig
    out: Path
    device_dir: Path
    float_onnx: Path
    initial: dict[str, QParams]
    evals: np.ndarray
    clients: list = field(default_factory=list)
    about: dict = field(default_factory=dict)
    prepare_s: float = 0.0
    ood: np.ndarray | None = None       # out-of-domain evaluation ids (simulation.fleet.ood_sequences)


def say(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


# How the server merges replies: nothing prepared depends on them (the centralized reference pools
# the data exactly), so runs that differ only in them share a preparation.
# The learned-range job's method and its knobs (issue 17), left out of the digest so that a run
# of the runtime job reuses a preparation made for the torch job; left out only when given, so
# the digests of runs made before they existed do not change.
LEARN_METHOD_FIELDS = ("method", "bins", "groups", "objective")
AGGREGATION_RULES = ("stats_rule", "absmax_rule", "absmax_clip", "trim", "round_factor", "lsq_rule", "secure", "dp")


def config_digest(cfg: SimulationConfig) -> str:
    """What must not change for a run directory to be reused: everything but the engine (how many
    CPUs does not change a result), how long the server waits (a fleet that lost devices resumes
    with a lower ``min_available``), the aggregation rules (secure aggregation included), the
    schedule and what its rounds choose (a plan, importance weight ranges), which the server's
    checkpoint digest checks itself (``server.config.ServerConfig.digest``: a run resumes only
    under the same schedule and rules)."""
    d = cfg.model_dump(mode="json")
    d.pop("engine", None)
    d.pop("name", None)         # a label
    for k in ("schedule", "plans", "weight_ranges", *AGGREGATION_RULES, *OPERATIONAL):   # chosen in the run
        d.get("server", {}).pop(k, None)
    for k in LEARN_METHOD_FIELDS:   # which learned-range job the devices run prepares nothing
        (d.get("server", {}).get("learn") or {}).pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def seed_run_dir(cfg: SimulationConfig, out: Path, source: Path) -> None:
    """Start run directory ``out`` from what ``source`` prepared (starting QParams, device
    directory, references; hard links where the filesystem allows): only for the same config
    digest, i.e. the same model, data, fleet and server recipe -- a schedule may differ. An ``out``
    that already has a run is left alone (it resumes)."""
    if (out / "run.json").is_file():
        return
    if not source.is_dir():
        raise ValueError(f"--prepared-from {source}: no such run directory (removed or moved?)")
    held = json.loads((source / "run.json").read_text()) if (source / "run.json").is_file() else {}
    if held.get("config_digest") != config_digest(cfg):
        raise ValueError(f"--prepared-from {source}: it was prepared for another config (digest "
                         f"{held.get('config_digest')}, this one {config_digest(cfg)})")
    if not (source / "device" / "fleet.json").is_file():
        raise ValueError(f"--prepared-from {source}: no prepared device directory in it")
    check_float_graph(source / "device", f"--prepared-from {source}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def link(src, dst):  # the float graph and weights (2-7 GB) stay stored once
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


def float_onnx_graph(model, cfg: SimulationConfig, out: Path, progress) -> Path:
    """The float graph: cached across runs under ~/.cache/fedquant/onnx for the shipped SmolLM2
    (exporting it takes minutes), exported into ``out/float`` for anything else; past 1 GB of
    weights with external data (``quant.onnxfile``). ``prepare`` links it into the device
    directory, its one place in the run."""
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
    say(progress, f"exporting the float ONNX graph of {cfg.model} (SmolLM2: a few minutes, once)")
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
    from quant.instrument import QuantLinear, fingerprint, get_qparams, quantize_, set_mode, set_qparams
    from quant.ptq import calibrate_activations
    from simulation.sequences import random_token_sequences

    # The instrumented copy shares the float model's weights (nothing here changes them) and
    # fake-quantizes them per forward instead of caching them: one model in memory, not three.
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    m = copy.deepcopy(model, memo=shared)
    quantize_(m, qcfg)
    for q in m.modules():
        if isinstance(q, QuantLinear):
            q.cache_weight = False
    set_mode(m, "float", "activations")
    ids = random_token_sequences(vocab, cfg.data.random_sequences, cfg.data.seq_len, cfg.data.seed)
    batches = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    points = calibrate_activations(m, batches, cfg.server.bins, cfg.server.calibrator_for(name))
    set_qparams(m, QParams(points, model=fingerprint(m)))
    qp = get_qparams(m)
    return QParams(qp.points, qp.model, 0, qp.smoothing, {**qp.meta, "recipe": "random-token calibration"})


def with_unit_smoothing(qp: QParams, model) -> QParams:
    """``qp`` with factors 1 on every Linear that has an input point or a per-token input: the
    exported model then has the Div node each Linear's SmoothQuant factors go into (x / 1 is x, bit
    for bit), so the factors a run learns are a patch of initializers, not a new graph."""
    from quant.export import float_linears

    per_token = set(per_token_linears(qp))
    ones = {p: np.ones(w.shape[1], np.float32) for p, (w, _) in float_linears(model).items()
            if f"{p}:input" in qp.points or p in per_token}
    return QParams(qp.points, qp.model, qp.version, {**ones, **qp.smoothing}, qp.meta, qp.importance)


def server_weights(prep: "Prepared"):
    """Linear path -> float weight (out, in), as the devices hold them (the device directory's
    ``model.weights.npz``): the server computes smoothing factors and weight points from these.
    A mapping that reads each weight from the file when asked: the server never holds them all
    (6 GB for a 1.5B model)."""
    from client.runtime import load_float_linears, weights_path

    name = next(iter(prep.initial))
    return load_float_linears(weights_path(prep.device_dir / name / "model.onnx")).weights()


def prepare(cfg: SimulationConfig, out: Path, progress: Callable[[str], None] | None = None) -> Prepared:
    """Everything the federation starts from (see the module docstring), reused when present."""
    import torch

    from client.device import write_device_dir
    from simulation.fleet import build_fleet, ood_sequences
    from simulation.models import load_model

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(cfg, out)
    if os.environ.get("FEDQUANT_MEMORY_CHECK", "on") != "off":   # off: to measure past the estimate
        est = check_run_fits(cfg)
        say(progress, f"memory estimate {est['peak'] / 1e9:.1f} GB at the peak")
    say(progress, f"loading {cfg.model}")
    model, tokenizer = load_model(cfg.model)
    model.eval()
    profiles = {e.load().name: (e.load(), e) for e in cfg.fleet}
    clients, evals, about = build_fleet(cfg.data, tokenizer, [(n, e.share) for n, (_, e) in profiles.items()])
    ood, ood_ids = ood_sequences(cfg.data, tokenizer)
    about = {**about, "ood_sequences": int(len(ood)), "ood_documents": len({w["id"] for w in ood_ids}),
             "ood_ids": ood_ids}
    device_dir = out / "device"
    prepared = (device_dir / "fleet.json").is_file()
    float_onnx = device_dir / FLOAT_ONNX if prepared else float_onnx_graph(model, cfg, out, progress)
    init_dir = out / "initial"
    initial: dict[str, QParams] = {}
    qcfgs = {n: quant_config_for(p, e) for n, (p, e) in profiles.items()}
    for name in profiles:
        f = init_dir / f"{name}.safetensors"
        if f.is_file():
            initial[name] = load_qparams(f)
        else:
            say(progress, f"{name}: calibrating the starting ranges on random token ids")
            initial[name] = random_calibration(model, qcfgs[name], cfg, model.config.vocab_size, name)
            if cfg.server.smoothing is not None and cfg.server.smoothing.alpha_for(name) is not None:
                initial[name] = with_unit_smoothing(initial[name], model)
            save_qparams(initial[name], f)
    if not (device_dir / "fleet.json").is_file():
        say(progress, "writing the device directory (a QDQ model per profile, the clients' data)")
        nodes = {str(c.pid): {"profile": c.profile, "train": c.train, "test": c.test, "client-id": c.client_id}
                 for c in clients}
        write_device_dir(device_dir, model=model, profiles={n: p for n, (p, _) in profiles.items()},
                         quant_configs=qcfgs, qparams=initial, float_onnx=float_onnx, nodes=nodes,
                         tflite_seq_len=cfg.data.seq_len)
        shutil.rmtree(out / "float", ignore_errors=True)  # linked into the device directory
        float_onnx = device_dir / FLOAT_ONNX
    check_float_graph(device_dir, str(out))
    del model, tokenizer   # the run reads the device directory: the float model must not outlive this
    release_memory()       # else the server process carries the export's heap through the whole run
    return Prepared(cfg, out, device_dir, float_onnx, initial, evals, clients, about,
                    time.perf_counter() - t0, ood=ood)


def check_run_fits(cfg: SimulationConfig, memory: int | None = None) -> dict:
    """``simulation.memory.check_fits`` for this config, before anything is loaded: a model that
    cannot fit is refused in a second, with the estimate and the reason, not killed after minutes."""
    from client.app import is_torch_job
    from simulation.memory import check_fits, model_size

    actors = max(1, int(cfg.engine.num_cpus // cfg.engine.client_cpus))
    torch_jobs = any(is_torch_job(s.job, cfg.server.learn.method) for s in cfg.server.schedule)
    return check_fits(model_size(cfg.model), batch=cfg.server.batch_size, seq_len=cfg.data.seq_len,
                      client_actors=min(actors, cfg.data.clients), torch_jobs=torch_jobs, memory=memory)


def check_float_graph(device_dir: Path, where: str) -> None:
    """The device directory's float graph and every data file it names are there (a run reuses a
    preparation by hard links: a half-copied or pruned directory must fail here, with the file)."""
    from quant.onnxfile import onnx_files

    path = device_dir / FLOAT_ONNX
    if not path.is_file():
        raise ValueError(f"{where}: the float graph {path} is missing")
    missing = [str(f) for f in onnx_files(path) if not f.is_file()]
    if missing:
        raise ValueError(f"{where}: the float graph's external data {missing[0]} is missing")


def check_run_dir(cfg: SimulationConfig, out: Path) -> None:
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


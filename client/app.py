"""The fedquant ClientApp (Flower 1.42 Message API): protocol ``fedquant.flower/1``.

This docstring is the protocol as the client implements it; the contract, with the server's side,
is docs/protocol.md. Everything a message asks is answered by :func:`handle`, a plain
function of ``(message_type, content, node_config, run_config, state) -> RecordDict`` that the
three decorated Flower functions wrap, so tests and benches can call it without Flower's runtime.

Where a node finds things
    run_config ``device-dir``: a device directory (client/device.py: fleet.json, clients/<pid>.npz,
    <profile>/model.onnx + profile.json + quant_config.json, torch/). node_config ``partition-id``
    (set by Flower in simulation, by the operator in a fleet) picks the node's entry in fleet.json;
    node_config ``profile`` and ``data-path`` (absolute, or relative to the device dir), when
    present, win over that entry. The node's ``client-id`` is its partition id (else the stem of
    its data path). run_config ``torch-lock`` (a file path): the processes that share the file
    run their torch jobs (plan, torch lsq) one at a time (:func:`torch_turn`; ``fedquant
    simulate`` sets it: its actors share one machine's memory).

Messages (server -> client) and OK replies
    ``query``, config ``{"fedquant": "hello"}``
        -> ``info`` ConfigRecord ``client-id`` str, ``profile`` str, ``train-examples``,
           ``test-examples``, ``held-version`` int; ``metrics`` ``{"num-examples": train-examples}``.
    ``train`` (jobs ``scout``, ``stats``, ``lsq``, ``plan``) and ``evaluate`` (job ``eval``), content
        ``arrays`` ArrayRecord (flat of ``quant.wire.encode_instruction``), ``config`` ConfigRecord
        ``header`` (json), ``profile`` (whose QParams these are), ``batch-size`` int, ``learn``
        (json of quant.learn_config.LearnConfig fields, lsq only; its batch_size defaults to batch-size)
        -> scout/stats/lsq: ``arrays`` (flat of the encoded reply), ``config`` ``{"header": json}``,
           ``metrics``; eval: ``metrics`` only (``num-examples``, ``nll_sum``, ``tokens``,
           ``perplexity``, ``version``, ...). Metrics hold plain int/float only (others dropped).
        A stats instruction whose config carries ``secure-cap`` int is one step of a SecAgg+ round
        (docs/privacy.md): the reply is then Flower's FitRes form, one float64 vector of
        ``quant.wire.stats_to_secure_vector`` with num_examples 1, which :func:`secure_aggregation_mod`
        (Flower's ``secaggplus_mod``) masks before it leaves the device. One whose config carries
        ``dp-clip`` float and ``dp-calibrator`` (json of quant.calibrate.CalibratorConfig) is a
        differentially private round: the reply is ``quant.wire.encode_dp_reply`` of
        ``client.jobs.dp_vector`` (the client's own calibrated ranges, clipped), no histograms.
        A scout instruction whose config carries ``secure-scout`` 1 or 2 is a pass of a private
        scouting round (SecAgg+, docs/privacy.md): the reply is the FitRes form of
        ``quant.private_scout.first_pass_vector`` (pass 1) or ``second_pass_vector`` of the bounds
        in the message's ``scout-bounds`` ArrayRecord (``bounds`` float32, pass 2).
        scout/stats/eval run on the profile's runtime (client.jobs): ONNX Runtime, or LiteRT for a
        profile with ``runtime = "litert"`` (client.litert_runtime, docs/litert.md); lsq on the
        instrumented torch model (client.learn), whatever the runtime, or, with ``learn``
        ``{"method": "runtime"}``, on ONNX Runtime too (client.learn_runtime: same reply);
        plan (client.plan) on the instrumented torch model too: FIT sums per point of the
        instruction's keys (``quant.wire.encode_plan_reply``); ONNX Runtime profiles only.
        scout/stats/lsq/plan use the node's ``train`` split, eval its ``test`` split. An
        instruction whose QParams change a point's spec (after a plan round) makes the runtime
        rebuild its graph (client.runtime.DeviceRuntime.patch).

Patching and the held version
    ``context.state["held"]`` (ConfigRecord ``{"version": int}``) is the QParams version the node
    last accepted; before the first it is the version the device bundle was installed with.
    eval always patches the instruction's QParams into the runtime first; scout/stats/lsq patch
    them when their version is newer than the held one or than the process's runtime (which the
    nodes an actor serves share, and which a new process loads at the installed version):
    statistics are then taken on the float graph with the instruction's smoothing, which the patch
    installs. An instruction older than
    the held version is refused. Every check (profile, decoding, job, version, data, memory
    budget, keys) runs before the patch, and the runtime's patch is atomic, so an error reply
    means nothing was patched and ``held`` is unchanged. (A failure of the job itself *after* an
    accepted patch keeps the patch: the QParams were valid and the held version records them.)

Error reply (nothing patched, nothing changed): ``{"error": ConfigRecord({"code", "reason"})}``,
    codes ``unknown_profile`` (the message's profile is not the node's, or the node's profile is
    not installed, or it runs LiteRT and the node has no LiteRT interpreter), ``bad_instruction``
    (the instruction does not decode -- the reason starts with the quant.wire code, e.g.
    ``shape: ...`` -- or names points the model lacks, or the job config is malformed),
    ``stale_version``, ``unknown_job`` (message type, hello verb or job), ``patch_refused``,
    ``memory_budget``, ``no_data`` (no device dir, node or data), and ``job_failed`` (anything
    else: exception type and message in the reason).

Caches (module level, so a process serving many nodes loads each model once): DeviceRuntime and
DeviceProfile per (device-dir, profile), the instrumented torch model per (device-dir, profile)
(built only when a torch lsq job arrives: torch is imported only then), node data per (device-dir,
data file). The device path (query, scout, stats, eval, runtime lsq) imports no torch. A process
holds only what the current job needs (:func:`release_for`): the float capture for scout, stats
and runtime lsq, the integer sessions for eval, the torch model for plan and torch lsq; the rest
is dropped when a job of another kind arrives and built again when needed.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import device, jobs
from client.profiles import DeviceProfile, MemoryBudgetError, plan_batch
from client.learn_runtime import learn_ranges_runtime, runtime_keys
from client.runtime import DeviceRuntime, FloatCapture, PatchRefused, qparams_path, release_memory
from quant.learn_config import LearnConfig
from quant.qparams import load_qparams
from quant import dp, private_scout
from quant.calibrate import CalibratorConfig
from quant.wire import (Instruction, WireError, decode_instruction, encode_dp_reply, encode_hessian_reply,
                        encode_lsq_reply, encode_plan_reply, encode_scout_reply, encode_stats_reply,
                        stats_to_secure_vector)

PROTOCOL = "fedquant.flower/1"
TRAIN_JOBS = ("scout", "stats", "lsq", "plan", "hessian")
EVAL_JOBS = ("eval",)
ERROR_CODES = ("unknown_profile", "bad_instruction", "stale_version", "unknown_job", "patch_refused",
               "memory_budget", "no_data", "job_failed")
_INT64 = 2**63 - 1


class Refused(Exception):
    """A message the client will not execute; becomes an error reply with ``code``."""

    def __init__(self, code: str, reason: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


# ------------------------------------------------------------------------------ caches

_LOCK = threading.RLock()
_RUNTIMES: dict[tuple[str, str], DeviceRuntime] = {}
_CAPTURES: dict[tuple[str, int], FloatCapture] = {}
_PROFILES: dict[tuple[str, str], DeviceProfile] = {}
_INSTALLED: dict[tuple[str, str], int] = {}
_TORCH: dict[tuple[str, str], object] = {}
_DATA: dict[tuple[str, str], dict[str, np.ndarray]] = {}


def clear_caches() -> None:
    """Forget every loaded model and dataset (tests; a process normally keeps them)."""
    with _LOCK:
        for c in (_RUNTIMES, _CAPTURES, _PROFILES, _INSTALLED, _TORCH, _DATA):
            c.clear()


def release_for(job: str, learn_method: str | None = None, runtime_key: tuple[str, str] | None = None) -> None:
    """Drop what a ``job`` does not use (issue 19, goal 6: a simulation actor serving nodes of two
    profiles held both integer sessions, the float graph's capture session and a torch model at
    once, 7 GB on SmolLM2): the torch model unless the job is plan or torch lsq, the float
    captures unless it is scout, stats or runtime lsq, the integer sessions unless it is eval,
    and then every session but that of ``runtime_key`` (device dir, profile), the job's own.
    Rounds run one job kind, so a process rebuilds the capture and the torch model at most once
    per round; an eval round rebuilds a session when its nodes change profile."""
    torch_job = is_torch_job(job, learn_method)
    capture_job = job in ("scout", "stats", "hessian") or (job == "lsq" and learn_method == "runtime")
    freed = False
    with _LOCK:
        if not torch_job and _TORCH:
            _TORCH.clear()
            freed = True
        if not capture_job and any(isinstance(c, FloatCapture) for c in _CAPTURES.values()):
            for key in [k for k, c in _CAPTURES.items() if isinstance(c, FloatCapture)]:
                del _CAPTURES[key]
            freed = True
        for key, rt in _RUNTIMES.items():
            if not isinstance(rt, DeviceRuntime):
                continue
            freed |= rt.release(session=job != "eval" or key != runtime_key, capture=not capture_job)
    if freed:
        release_memory()


def is_torch_job(job: str, learn_method: str | None) -> bool:
    """Jobs that run on the instrumented torch model (autograd): plan, and lsq unless its method
    is ``runtime``."""
    return job == "plan" or (job == "lsq" and learn_method != "runtime")


@contextlib.contextmanager
def torch_turn(lock_path: str | None):
    """A torch job's turn: with ``lock_path`` (run_config ``torch-lock``, which ``fedquant
    simulate`` sets), at most one process that shares the file runs a torch job at a time; the
    others wait, idle. A phone runs one job anyway; a simulation's actors share one machine, and
    two torch jobs at once, 3-4 GB each on SmolLM2, were the default run's peak (issue 19, goal 6).
    Taken after :func:`release_for`, so a waiting process holds no capture; the heap is trimmed
    before the turn passes on. Without a path, nothing."""
    if not lock_path:
        yield
        return
    import fcntl

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            release_memory()      # the job's freed heap goes back before the next process's turn
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(cache: dict, key, load):
    with _LOCK:  # one load per key even if a process runs nodes on threads
        if key not in cache:
            cache[key] = load()
        return cache[key]


def get_profile(device_dir: str, profile: str) -> DeviceProfile:
    try:
        return _cached(_PROFILES, (device_dir, profile), lambda: device.load_device_profile(device_dir, profile))
    except device.UnknownProfile as e:
        raise Refused("unknown_profile", str(e)) from None


def check_runtime(profile: DeviceProfile) -> None:
    """A LiteRT profile on a node without the LiteRT interpreter is not installed here:
    ``unknown_profile``, with how to install it (the hello says so, so the node stays out of
    the roster instead of failing every job)."""
    if profile.runtime == "litert":
        from client.litert_runtime import litert_available

        if not litert_available():
            from quant.tflite import EXTRA_HINT

            raise Refused("unknown_profile", f"profile {profile.name!r} runs LiteRT and this node "
                                             f"lacks it: {EXTRA_HINT}")


def get_runtime(device_dir: str, profile: str) -> DeviceRuntime:
    """The node's runtime (one per process per device dir and profile): a DeviceRuntime (ONNX
    Runtime), or for a LiteRT profile a ``client.litert_runtime.LiteRTDevice`` (the same
    interface: docs/litert.md)."""
    p = get_profile(device_dir, profile)
    if p.runtime == "litert":
        check_runtime(p)
        return _cached(_RUNTIMES, (device_dir, profile), lambda: _litert_runtime(device_dir, profile, p))

    def load():
        device.bundle_model(device_dir, profile)  # a clear error when the bundle is missing
        float_onnx = device.float_onnx_path(device_dir)
        capture = _cached(_CAPTURES, (str(float_onnx), p.threads), lambda: FloatCapture(float_onnx, p.threads))
        return DeviceRuntime(device.model_path(device_dir, profile), threads=p.threads,
                             float_onnx=float_onnx, capture=capture, weight_storage=p.int8_weight_storage)
    return _cached(_RUNTIMES, (device_dir, profile), load)


def _litert_runtime(device_dir: str, profile: str, p: DeviceProfile):
    """A LiteRT profile's device: its ``model.tflite``, the bundle's float weights and installed
    QParams, and the directory's ``float.tflite`` (one capture per process, shared by its LiteRT
    profiles, as the float ONNX graph is)."""
    from client.litert_runtime import LiteRTCapture, LiteRTDevice
    from client.runtime import load_float_linears, weights_path

    try:
        model = device.tflite_model_path(device_dir, profile)
        float_tflite = device.float_tflite_path(device_dir)
    except device.UnknownProfile as e:
        raise Refused("unknown_profile", str(e)) from None
    bundle = device.bundle_model(device_dir, profile)
    linears = load_float_linears(weights_path(bundle))
    capture = _cached(_CAPTURES, (str(float_tflite), p.threads),
                      lambda: LiteRTCapture(float_tflite, linears.weights(), threads=p.threads))
    return LiteRTDevice(model, float_tflite, load_qparams(qparams_path(bundle)), linears,
                        threads=p.threads, capture=capture)


def installed_version(device_dir: str, profile: str) -> int:
    """Version of the QParams the bundle was installed with (read from disk, not the runtime,
    which other nodes of this process may have patched since)."""
    def load():
        return int(load_qparams(qparams_path(device.bundle_model(device_dir, profile))).version)
    try:
        return _cached(_INSTALLED, (device_dir, profile), load)
    except device.UnknownProfile as e:
        raise Refused("unknown_profile", str(e)) from None


def get_torch_model(device_dir: str, profile: str):
    """The instrumented torch model for the lsq job: the float ``torch/`` model, quantized with
    the profile's QuantConfig. torch and transformers are imported here, on the first lsq job.
    A process keeps one torch model: a simulation actor that serves nodes of several profiles
    would otherwise hold one per profile (on SmolLM2, two of them next to the ONNX runtimes ran a
    24 GB machine out of memory); switching profile costs a rebuild of a few seconds."""
    def load():
        import gc

        for key in [k for k in _TORCH if k != (device_dir, profile)]:
            del _TORCH[key]
        gc.collect()
        from transformers import AutoModelForCausalLM

        from quant.instrument import quantize_

        config = device.load_quant_config(device_dir, profile)
        model = AutoModelForCausalLM.from_pretrained(device.torch_model_dir(device_dir))
        model.eval()
        quantize_(model, config)
        return model
    try:
        return _cached(_TORCH, (device_dir, profile), load)
    except device.UnknownProfile as e:
        raise Refused("unknown_profile", str(e)) from None


# ------------------------------------------------------------------------------ the node

@dataclass(frozen=True)
class Node:
    device_dir: str
    client_id: str
    pid: str | None
    profile: str
    data_path: str | None


def resolve_node(node_config, run_config) -> Node:
    """Who this node is, from node_config and run_config (see the module docstring)."""
    device_dir = run_config.get("device-dir")
    if not device_dir:
        raise Refused("no_data", "run_config has no 'device-dir' (the device directory)")
    path = Path(str(device_dir))
    if not path.is_absolute() and not path.exists():  # `flwr run .`: relative to the project
        path = Path(__file__).resolve().parent.parent / path
    device_dir = str(path.resolve())
    pid = node_config.get("partition-id")
    pid = None if pid is None else str(pid)
    data_path = node_config.get("data-path")
    data_path = None if data_path in (None, "") else str(data_path)
    profile = node_config.get("profile")
    try:
        if pid is None and data_path is None:
            raise device.DeviceDirError("node_config has neither 'partition-id' nor 'data-path'")
        # fleet.json is consulted only for what node_config does not say
        entry = device.node_entry(device_dir, pid) if pid is not None and not (profile and data_path) else None
    except device.DeviceDirError as e:
        raise Refused("no_data", str(e)) from None
    if not profile:
        if entry is None:
            raise Refused("unknown_profile", "node_config has a 'data-path' but no 'profile'")
        profile = entry["profile"]
    client_id = pid if pid is not None else Path(data_path).stem
    return Node(device_dir, client_id, pid, str(profile), data_path)


def node_data(node: Node) -> dict[str, np.ndarray]:
    try:
        key = node.data_path or device.node_entry(node.device_dir, node.pid)["data"]
        return _cached(_DATA, (node.device_dir, key),
                       lambda: device.load_node_data(node.device_dir, node.pid, node.data_path))
    except device.DeviceDirError as e:
        raise Refused("no_data", str(e)) from None


def held_version(state: RecordDict, node: Node) -> int:
    rec = state.get("held")
    if rec is not None and "version" in rec:
        return int(rec["version"])
    return installed_version(node.device_dir, node.profile)


def _set_held(state: RecordDict, version: int) -> None:
    state["held"] = ConfigRecord({"version": int(version)})


# ------------------------------------------------------------------------------ replies

def error_reply(code: str, reason: str) -> RecordDict:
    return RecordDict({"error": ConfigRecord({"code": code, "reason": str(reason)[:2000]})})


def _metric_value(v):
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v) if -_INT64 - 1 <= int(v) <= _INT64 else float(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        items = [_metric_value(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
        if not items or any(x is None or isinstance(x, list) for x in items):
            return None
        return items if all(isinstance(x, int) for x in items) else [float(x) for x in items]
    return None


def metric_record(metrics: dict) -> MetricRecord:
    """MetricRecord of the int/float (and list) entries of ``metrics``; bools become 0/1,
    numpy scalars Python numbers, anything else is dropped."""
    out = {}
    for k, v in metrics.items():
        v = _metric_value(v)
        if v is not None:
            out[str(k)] = v
    return MetricRecord(out)


def _payload_reply(flat, header, metrics) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in flat.items()}),
                       "config": ConfigRecord({"header": json.dumps(header)}),
                       "metrics": metric_record(metrics)})


# ------------------------------------------------------------------------------ handling

def handle(message_type: str, content: RecordDict, node_config, run_config, state: RecordDict) -> RecordDict:
    """Answer one message: the OK reply content, or an error reply (see the module docstring).
    Never raises for what a message contains."""
    try:
        node = resolve_node(node_config, run_config)
        if message_type == "query":
            return _hello(node, content, state)
        if message_type in ("train", "evaluate"):
            with contextlib.ExitStack() as turn:     # a torch job's turn (torch_turn) ends with the reply
                return _job(message_type, node, content, state, turn, run_config)
        raise Refused("unknown_job", f"message type {message_type!r} (this client answers query, train, evaluate)")
    except Refused as e:
        return error_reply(e.code, e.reason)
    except MemoryBudgetError as e:
        return error_reply("memory_budget", str(e))
    except Exception as e:  # noqa: BLE001 -- a node answers, it does not crash the run
        return error_reply("job_failed", f"{type(e).__name__}: {e}")


def _config(content: RecordDict) -> ConfigRecord:
    rec = content.get("config") if hasattr(content, "get") else None
    if not isinstance(rec, ConfigRecord):
        raise Refused("bad_instruction", "malformed: the message has no 'config' ConfigRecord")
    return rec


def _hello(node: Node, content: RecordDict, state: RecordDict) -> RecordDict:
    verb = _config(content).get("fedquant")
    if verb != "hello":
        raise Refused("unknown_job", f"query {verb!r} (this client answers 'hello')")
    check_runtime(get_profile(node.device_dir, node.profile))  # the node's profile must be installed
    data = node_data(node)
    n_train, n_test = int(len(data["train"])), int(len(data["test"]))
    return RecordDict({
        "info": ConfigRecord({"client-id": node.client_id, "profile": node.profile,
                              "train-examples": n_train, "test-examples": n_test,
                              "held-version": held_version(state, node)}),
        "metrics": MetricRecord({"num-examples": n_train})})


def _instruction(content: RecordDict, cfg: ConfigRecord) -> Instruction:
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        raise Refused("bad_instruction", "malformed: the message has no 'arrays' ArrayRecord")
    header = cfg.get("header")
    try:
        if not isinstance(header, str):
            raise WireError("malformed", "config 'header' must be a JSON string")
        try:
            header = json.loads(header)
        except ValueError as e:
            raise WireError("malformed", f"header is not JSON: {e}") from None
        return decode_instruction({k: v.numpy() for k, v in arrays.items()}, header)
    except WireError as e:
        raise Refused("bad_instruction", str(e)) from None


def _batch_size(cfg: ConfigRecord) -> int:
    b = cfg.get("batch-size", 8)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise Refused("bad_instruction", f"config: batch-size must be a positive int, got {b!r}")
    return b


def _learn_config(cfg: ConfigRecord, batch_size: int):
    from pydantic import ValidationError

    raw = cfg.get("learn", "{}") or "{}"
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return LearnConfig(**{"batch_size": batch_size, **fields})
    except (ValueError, TypeError, ValidationError) as e:
        raise Refused("bad_instruction", f"config: learn: {e}") from None


def _sequences(data: dict, split: str, node: Node) -> np.ndarray:
    seqs = data[split]
    if seqs.shape[0] == 0 or seqs.shape[1] < 2:
        raise Refused("no_data", f"node {node.client_id}: no {split} sequences (shape {seqs.shape})")
    return seqs


def _precheck_budget(rt: DeviceRuntime, ins: Instruction, seqs, batch_size: int, profile: DeviceProfile) -> None:
    """The memory plan of the job, before anything is patched (the jobs would raise the same
    MemoryBudgetError, but only after an eval's patch)."""
    if ins.job == "eval":
        vocab = rt.logits_width()
        widths = [vocab]
    else:
        widths = jobs.exposed_widths(rt, ins.keys)
    plan_batch(batch_size, seqs.shape[1], widths, profile, ins.job,
               fixed_bytes=sum(8 * c * c for c in ins.hessian.values()))


def _job(message_type: str, node: Node, content: RecordDict, state: RecordDict, turn: contextlib.ExitStack,
         run_config) -> RecordDict:
    cfg = _config(content)
    profile_name = cfg.get("profile")
    if profile_name != node.profile:
        raise Refused("unknown_profile", f"the message is for profile {profile_name!r}, "
                                         f"node {node.client_id} runs {node.profile!r}")
    profile = get_profile(node.device_dir, node.profile)
    ins = _instruction(content, cfg)
    allowed = TRAIN_JOBS if message_type == "train" else EVAL_JOBS
    if ins.job not in allowed:
        raise Refused("unknown_job", f"job {ins.job!r} in a {message_type!r} message (expects {allowed})")
    held = held_version(state, node)
    if ins.version < held:
        raise Refused("stale_version", f"instruction version {ins.version} is older than the held version {held}")
    batch_size = _batch_size(cfg)
    learn = _learn_config(cfg, batch_size) if ins.job == "lsq" else None
    if ins.job in ("scout", "lsq") and not ins.keys:
        raise Refused("bad_instruction", f"missing_key: a {ins.job} instruction must name its keys")
    data = node_data(node)
    seqs = _sequences(data, "test" if ins.job == "eval" else "train", node)

    release_for(ins.job, learn.method if learn is not None else None, (node.device_dir, node.profile))
    if is_torch_job(ins.job, learn.method if learn is not None else None):
        turn.enter_context(torch_turn(run_config.get("torch-lock")))
    rt = get_runtime(node.device_dir, node.profile)
    if ins.job == "lsq" and learn.method == "runtime":
        if profile.runtime != "onnxruntime":
            raise Refused("bad_instruction", f"learn.method 'runtime' runs on ONNX Runtime; this phone runs "
                                             f"{profile.runtime} (its lsq job is the torch one)")
        try:
            runtime_keys(rt, ins)
        except ValueError as e:
            raise Refused("bad_instruction", f"keys: {e}") from None
        _precheck_budget(rt, ins, seqs, batch_size, profile)
    elif ins.job == "lsq":
        from client.learn import chosen_keys
        from quant.instrument import fingerprint

        model = get_torch_model(node.device_dir, node.profile)
        try:
            chosen_keys(model, ins.qparams, ins, learn.which)
        except ValueError as e:
            raise Refused("bad_instruction", f"keys: {e}") from None
        if ins.qparams.model != fingerprint(model):  # learn_ranges loads them strictly
            raise Refused("patch_refused", f"QParams are for model {ins.qparams.model!r}, the torch "
                                           f"model is {fingerprint(model)!r}")
    elif ins.job == "plan":
        from client.plan import plan_keys_problems
        from quant.instrument import fingerprint

        if profile.runtime != "onnxruntime":
            raise Refused("bad_instruction", f"a plan changes specs, which this phone's {profile.runtime} "
                                             "model cannot take")
        model = get_torch_model(node.device_dir, node.profile)
        unknown = plan_keys_problems(model, ins)
        if unknown:
            raise Refused("bad_instruction", f"keys: instruction names points this model does not have: {unknown[:5]}")
        if ins.qparams.model != fingerprint(model):
            raise Refused("patch_refused", f"QParams are for model {ins.qparams.model!r}, the torch "
                                           f"model is {fingerprint(model)!r}")
    elif ins.job == "eval":
        _precheck_budget(rt, ins, seqs, batch_size, profile)
    else:
        try:
            jobs.job_keys(rt, ins)
        except ValueError as e:
            raise Refused("bad_instruction", f"keys: {e}") from None
        if ins.job == "hessian":
            wrong = jobs.hessian_problems(rt, ins)
            if wrong:
                raise Refused("bad_instruction", f"hessian: {wrong[0]}" + (f" (and {len(wrong) - 1} more)"
                                                                          if len(wrong) > 1 else ""))
            if ins.qparams.model != rt.qparams.model:
                raise Refused("patch_refused", f"second moments asked of model {ins.qparams.model!r}, this phone "
                                               f"runs {rt.qparams.model!r}")
        _precheck_budget(rt, ins, seqs, batch_size, profile)

    patch_s = None
    # The node's held version says what it accepted; the process's runtime, shared by the nodes an
    # actor serves (or new after a restart), may still be behind it: patch that too.
    runtime_behind = int(rt.qparams.version) < ins.version
    # (also an instruction without points: a profile with every input per token gets only its smoothing
    # factors; a patch that changes nothing keeps the session)
    # a hessian instruction carries no points (its job reads the float graph): nothing to patch or hold
    if ins.job != "hessian" and (ins.job == "eval" or ins.version > held or runtime_behind):
        try:
            patch_s = rt.patch(ins.qparams)["total_s"]
        except PatchRefused as e:
            raise Refused("patch_refused", str(e)) from None
        _set_held(state, max(held, ins.version))

    if ins.job == "eval":
        metrics = jobs.evaluate(rt, None, seqs, batch_size=batch_size, profile=profile)
        if patch_s is not None:
            metrics["patch_s"] = patch_s
        return RecordDict({"metrics": metric_record(metrics)})
    if ins.job == "scout":
        scout_pass, bounds = _secure_scout(content, cfg, ins)
        reply, metrics = jobs.scout(rt, ins, seqs, batch_size=batch_size, profile=profile)
        if scout_pass == 1:
            return _secure_stats_reply(private_scout.first_pass_vector(reply, ins), metrics, patch_s)
        if scout_pass == 2:
            return _secure_stats_reply(private_scout.second_pass_vector(reply, ins, bounds), metrics, patch_s)
        flat, header = encode_scout_reply(reply, ins)
    elif ins.job == "stats":
        secure_cap = cfg.get("secure-cap")
        if secure_cap is not None and (not isinstance(secure_cap, int) or secure_cap < 1 or ins.absmax):
            raise Refused("bad_instruction", f"secure-cap {secure_cap!r}: a secure statistics round needs a "
                                             "positive int cap and no abs-max points")
        dp_clip, dp_calibrator = cfg.get("dp-clip"), cfg.get("dp-calibrator")
        if dp_clip is not None:
            try:
                dp_calibrator = CalibratorConfig.model_validate_json(str(dp_calibrator))
                if not (isinstance(dp_clip, float) and dp_clip > 0) or ins.absmax:
                    raise ValueError(f"dp-clip {dp_clip!r} must be a positive float, with no abs-max points")
            except ValueError as e:
                raise Refused("bad_instruction", f"a DP statistics round: {str(e)[:300]}") from None
        reply, metrics = jobs.statistics(rt, ins, seqs, batch_size=batch_size, profile=profile)
        if secure_cap is not None and dp_clip is not None:   # DP under SecAgg+: the client adds its noise share
            share = cfg.get("dp-noise-share")
            if not (isinstance(share, float) and share > 0):
                raise Refused("bad_instruction", f"dp-noise-share {share!r}: a secure DP round needs a positive "
                                                 "float share")
            vector = dp.noised_secure_vector(jobs.dp_vector(reply, ins, dp_calibrator, dp_clip), share, dp_clip,
                                             np.random.default_rng())       # OS entropy: the server must not know it
            return _secure_stats_reply(vector, metrics, patch_s)
        if secure_cap is not None:
            return _secure_stats_reply(stats_to_secure_vector(reply, ins, secure_cap), metrics, patch_s)
        if dp_clip is not None:
            flat, header = encode_dp_reply(jobs.dp_vector(reply, ins, dp_calibrator, dp_clip), ins)
        else:
            flat, header = encode_stats_reply(reply, ins)
    elif ins.job == "hessian":
        reply, metrics = jobs.hessian(rt, ins, seqs, batch_size=batch_size, profile=profile)
        flat, header = encode_hessian_reply(reply, ins)
    elif ins.job == "plan":
        from client.plan import plan_sensitivity

        qc = device.load_quant_config(node.device_dir, node.profile)
        reply, metrics = plan_sensitivity(model, ins.qparams, ins, seqs, qc.activation, qc.weight)
        flat, header = encode_plan_reply(reply, ins)
    elif learn.method == "runtime":
        reply, metrics = learn_ranges_runtime(rt, ins, seqs, learn, batch_size=batch_size, profile=profile)
        flat, header = encode_lsq_reply(reply, ins)
    else:
        from client.learn import learn_ranges

        reply, metrics = learn_ranges(model, ins.qparams, ins, seqs, learn)
        flat, header = encode_lsq_reply(reply, ins)
    if patch_s is not None:
        metrics["patch_s"] = patch_s
    metrics["reply_bytes"] = int(sum(np.asarray(a).nbytes for a in flat.values()))
    return _payload_reply(flat, header, metrics)


def _secure_scout(content: RecordDict, cfg: ConfigRecord, ins: Instruction) -> tuple[int | None, np.ndarray | None]:
    """A scouting instruction's ``secure-scout`` pass (None: in the clear) and, in pass 2, the
    server's per-channel bounds, checked before the job runs (``quant.private_scout``)."""
    scout_pass = cfg.get("secure-scout")
    if scout_pass is None:
        return None, None
    if scout_pass not in (1, 2) or isinstance(scout_pass, bool):
        raise Refused("bad_instruction", f"secure-scout {scout_pass!r}: a private scouting pass is 1 or 2")
    if scout_pass == 1:
        return 1, None
    rec = content.get("scout-bounds")
    bounds = rec.get("bounds") if isinstance(rec, ArrayRecord) else None
    bounds = np.asarray(bounds.numpy(), dtype=np.float64) if bounds is not None else None
    n = private_scout.second_pass_length(ins)
    if bounds is None or bounds.shape != (n,) or not (np.all(np.isfinite(bounds)) and np.all(bounds > 0)):
        raise Refused("bad_instruction", f"secure-scout 2 needs a 'scout-bounds' record of {n} finite positive "
                                         f"bounds, got {None if bounds is None else bounds.shape}")
    return 2, bounds


def _secure_stats_reply(vector: np.ndarray, metrics: dict, patch_s) -> RecordDict:
    """The statistics as Flower's FitRes (the form ``secaggplus_mod`` reads): one vector, weight 1,
    so the secure aggregate is the clients' mean and the server multiplies it by their number."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    if patch_s is not None:
        metrics["patch_s"] = patch_s
    scalars = {k: v for k, v in ((k, _metric_value(v)) for k, v in metrics.items()) if isinstance(v, (int, float))}
    res = FitRes(Status(Code.OK, "secure statistics"), ndarrays_to_parameters([vector]), 1, scalars)
    return compat.fitres_to_recorddict(res, keep_input=False)


# ------------------------------------------------------------------------------ Flower

def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod (Bell et al., CCS 2020) for the messages of a secure round,
    which carry its config record; every other message passes through untouched (the mod alone
    would refuse them). At the masked-vector step it calls this app, whose reply it masks, so the
    statistics leave the device only as a share of a sum."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_app(defaults: dict | None = None, mods: list | None = None) -> ClientApp:
    """The ClientApp; ``defaults`` fill run_config keys the run does not set (``fedquant simulate``
    passes its ``device-dir`` this way, since Flower's simulation engine has no run config of its
    own). ``mods`` are Flower ClientApp mods around every message (a simulation's unreliable
    devices: ``simulation.faults``), outside :func:`secure_aggregation_mod`, which every app has.
    The app object is pickled to every simulation actor, so both must be picklable."""
    defaults = dict(defaults or {})
    client_app = ClientApp(mods=[*(mods or []), secure_aggregation_mod])

    def answer(category: str, msg: Message, context: Context) -> Message:
        run_config = {**defaults, **{k: v for k, v in context.run_config.items() if v not in (None, "")}}
        content = handle(category, msg.content, context.node_config, run_config, context.state)
        return Message(content=content, reply_to=msg)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return answer("query", msg, context)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return answer("train", msg, context)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer("evaluate", msg, context)

    return client_app


app = make_app()

"""The device directory (docs/protocol.md, "Where a node finds its model, profile and data"):
one writer on the export side, and the readers a node uses to find its profile, model and data.

    <device-dir>/fleet.json                 {"format": "fedquant.fleet/1", "nodes": {"<pid>": {"profile",
                                             "data": "clients/<pid>.npz"}}, "profiles": [...],
                                             "torch-model": "torch", "float-onnx": "float.onnx"}
    <device-dir>/float.onnx                 the float graph statistics are captured on (shared), its
                                             weights always in float.onnx.data (quant.onnxfile)
    <device-dir>/clients/<pid>.npz          "train" and "test": int64 token ids [N, T], no pickle
    <device-dir>/<profile>/model.onnx       client.runtime device bundle (+ .names.json, .weights.npz,
                                             .qparams.safetensors, .device.json)
    <device-dir>/<profile>/profile.json     client.profiles.DeviceProfile
    <device-dir>/<profile>/quant_config.json  quant.instrument.QuantConfig (LSQ job only)
    <device-dir>/torch/                     Hugging Face save_pretrained of the *float* model (LSQ only)

With a LiteRT profile (``DeviceProfile.runtime == "litert"``, docs/litert.md), also:

    <device-dir>/float.tflite               the float model as a .tflite (quant.tflite.convert_float, no
                                             QParams): what a LiteRT phone captures statistics on (shared)
    <device-dir>/<profile>/model.tflite     the profile's QDQ .tflite made from its installed QParams
                                             (quant.tflite.quantize_points); releases are patched into it.
                                             It reads the bundle's model.weights.npz and
                                             model.qparams.safetensors; the rest of the ONNX bundle stays
                                             for the server (its evaluation and export use ONNX Runtime)

Both ``.tflite`` files have a fixed input shape ``[LITERT_BATCH, seq_len]`` (``fleet.json``
``"tflite-seq-len"``): the nodes' sequences must have that length.

``fleet.json`` is written last and atomically, so a directory with a fleet.json is complete.
The float graph is linked into the directory (``float-onnx``; a hard link, a copy across
filesystems), or written there with external data when it is one file: ONNX Runtime maps an
external data file, so every process of a simulation -- the client actors, the server -- shares
one copy of the float weights in page cache instead of parsing its own into Python and copying
it for its session (below 1 GB of weights a session still keeps a private prepacked copy:
client.runtime.ort_session). The directory can be moved or installed elsewhere: readers pass it
to ``DeviceRuntime`` explicitly instead of trusting the
absolute path recorded in the bundle. Readers need numpy, json and pydantic only (torch is
imported by ``write_device_dir`` and ``load_quant_config``, both off the scout/stats/eval path).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.profiles import DeviceProfile
from quant.qparams import QParams, atomic_write_bytes

FLEET_FORMAT = "fedquant.fleet/1"
FLEET_FILE = "fleet.json"
FLOAT_ONNX = "float.onnx"
TORCH_DIR = "torch"
MODEL_FILE = "model.onnx"
PROFILE_FILE = "profile.json"
QUANT_CONFIG_FILE = "quant_config.json"
SPLITS = ("train", "test")
FLOAT_TFLITE = "float.tflite"
TFLITE_MODEL = "model.tflite"
LITERT_BATCH = 1        # the .tflite's fixed batch: any number of sequences runs, one at a time


class DeviceDirError(ValueError):
    """A device directory that is missing something or holds something malformed; the message
    names the path."""


class UnknownNode(DeviceDirError):
    """A partition id that fleet.json does not list."""


class UnknownProfile(DeviceDirError):
    """A profile the device directory has no bundle for."""


# ------------------------------------------------------------------------------ paths

def model_path(device_dir, profile: str) -> Path:
    """``<device-dir>/<profile>/model.onnx``: what ``DeviceRuntime`` opens."""
    return Path(device_dir) / profile / MODEL_FILE


def float_onnx_path(device_dir) -> Path:
    """The float graph of the directory (what ``DeviceRuntime(float_onnx=...)`` gets)."""
    fleet = read_fleet(device_dir)
    return Path(device_dir) / fleet.get("float-onnx", FLOAT_ONNX)


def float_tflite_path(device_dir) -> Path:
    """The float ``.tflite`` a LiteRT phone captures statistics on (``fleet.json`` ``float-tflite``)."""
    fleet = read_fleet(device_dir)
    if "float-tflite" not in fleet:
        raise DeviceDirError(f"{Path(device_dir) / FLEET_FILE}: no 'float-tflite' (the directory was "
                             "written without a LiteRT profile)")
    return Path(device_dir) / fleet["float-tflite"]


def tflite_model_path(device_dir, profile: str) -> Path:
    """``<device-dir>/<profile>/model.tflite`` of a LiteRT profile, checked to exist."""
    return _profile_file(device_dir, profile, TFLITE_MODEL)


def torch_model_dir(device_dir) -> Path:
    fleet = read_fleet(device_dir)
    return Path(device_dir) / fleet.get("torch-model", TORCH_DIR)


# ------------------------------------------------------------------------------ writer

def _check_name(what: str, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} cannot be a directory name")


def _int_tokens(a, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be an integer array [N, T], got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def write_device_dir(out, *, model, profiles: Mapping[str, DeviceProfile], quant_configs: Mapping[str, Any],
                     qparams: Mapping[str, QParams], float_onnx, nodes: Mapping[str, Mapping],
                     tflite_seq_len: int | None = None) -> Path:
    """Write a device directory to ``out`` (export side: needs torch).

    ``model`` is the *float* Hugging Face model (not instrumented: ``torch/`` must load as a plain
    model, and the bundles re-quantize its float weights). ``profiles``, ``quant_configs`` and
    ``qparams`` are keyed by profile name (the same names, each ``DeviceProfile.name`` equal to its
    key). ``float_onnx`` is the float graph of ``model`` (a path or ModelProto). ``nodes`` maps a
    partition id to ``{"profile": name, "train": ids [N, T], "test": ids [M, T]}``. Everything is
    checked before anything is written; ``fleet.json`` goes last, atomically. Returns its path.

    A LiteRT profile (``runtime = "litert"``) also gets its ``model.tflite``, and the directory
    one ``float.tflite``, both of input length ``tflite_seq_len`` (default: the nodes' ``T``,
    which must then be one length): two conversions by ``litert_torch`` (the ``fedquant[litert]``
    extra; ImportError saying how to install it, before anything is written).
    """
    import onnx

    from client.runtime import save_device_bundle
    from quant.instrument import QuantConfig, quant_points
    from quant.onnxfile import data_file, link_onnx, load_onnx, save_onnx

    out = Path(out)
    names = sorted(profiles)
    if set(quant_configs) != set(names) or set(qparams) != set(names):
        raise ValueError(f"profiles {names}, quant_configs {sorted(quant_configs)} and qparams "
                         f"{sorted(qparams)} must name the same profiles")
    for name in names:
        _check_name("profile", name)
        if not isinstance(profiles[name], DeviceProfile) or profiles[name].name != name:
            raise ValueError(f"profiles[{name!r}] must be a DeviceProfile named {name!r}")
        if not isinstance(quant_configs[name], QuantConfig):
            raise ValueError(f"quant_configs[{name!r}] must be a quant.instrument.QuantConfig")
        qparams[name].validate()
    if quant_points(model):
        raise ValueError("write_device_dir needs the float model; this one is instrumented "
                         "(save it before quant.instrument.quantize_)")
    if not nodes:
        raise ValueError("no nodes")
    data, node_profile = {}, {}
    for pid, node in nodes.items():
        pid = str(pid)
        if pid in data:
            raise ValueError(f"partition id {pid!r} given twice")
        _check_name("partition id", pid)
        if node.get("profile") not in profiles:
            raise ValueError(f"node {pid}: profile {node.get('profile')!r} is not one of {names}")
        node_profile[pid] = node["profile"]
        data[pid] = {s: _int_tokens(node[s], f"node {pid} {s}") for s in SPLITS}
    litert = [n for n in names if profiles[n].runtime == "litert"]
    if litert:
        from quant.tflite import EXTRA_HINT, missing_litert

        if missing_litert():
            raise ImportError(f"profiles {litert} run LiteRT, and {', '.join(missing_litert())} cannot be "
                              f"imported: {EXTRA_HINT}")
        if tflite_seq_len is None:
            lengths = sorted({int(a.shape[1]) for d in data.values() for a in d.values() if len(a)})
            if len(lengths) != 1:
                raise ValueError(f"LiteRT profiles {litert}: the .tflite has one input length; the nodes' "
                                 f"sequences have {lengths}: give tflite_seq_len")
            tflite_seq_len = lengths[0]

    out.mkdir(parents=True, exist_ok=True)
    stale = out / FLEET_FILE
    stale.unlink(missing_ok=True)  # a half-rewritten directory must not look complete
    fl = out / FLOAT_ONNX
    if isinstance(float_onnx, onnx.ModelProto):
        save_onnx(float_onnx, fl, external_threshold=0)
    elif Path(float_onnx).resolve() != fl.resolve():
        if data_file(float_onnx).is_file():
            link_onnx(float_onnx, fl)  # hard links: the float graph is stored once (2-7 GB)
        else:                          # one file: its weights go to a data file, to be mapped
            save_onnx(load_onnx(float_onnx), fl, external_threshold=0)
    for i, name in enumerate(names):  # the float weights once, linked by the other profiles
        save_device_bundle(model, qparams[name], model_path(out, name), float_onnx=fl,
                           weights_from=model_path(out, names[0]) if i else None)
        atomic_write_bytes(out / name / PROFILE_FILE, profiles[name].model_dump_json(indent=1).encode())
        atomic_write_bytes(out / name / QUANT_CONFIG_FILE, quant_configs[name].model_dump_json(indent=1).encode())
    if litert:
        _write_tflites(out, model, {n: qparams[n] for n in litert}, int(tflite_seq_len))
    model.save_pretrained(out / TORCH_DIR)
    for pid, arrays in data.items():
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(out / "clients" / f"{pid}.npz", buf.getvalue())
    fleet = {"format": FLEET_FORMAT,
             "nodes": {pid: {"profile": node_profile[pid], "data": f"clients/{pid}.npz"} for pid in sorted(data, key=_pid_order)},
             "profiles": names, "torch-model": TORCH_DIR, "float-onnx": FLOAT_ONNX}
    if litert:
        fleet |= {"float-tflite": FLOAT_TFLITE, "tflite-seq-len": int(tflite_seq_len)}
    return atomic_write_bytes(out / FLEET_FILE, json.dumps(fleet, indent=1).encode())


def _write_tflites(out: Path, model, qparams: Mapping[str, QParams], seq_len: int) -> None:
    """``float.tflite`` (the float model, for statistics) and each LiteRT profile's
    ``model.tflite`` (its QParams' points in QDQ form, ``quant.tflite``)."""
    import os
    import tempfile

    from quant.tflite import convert_float, quantize_points

    with tempfile.TemporaryDirectory(prefix="fedquant-tflite-", dir=out) as tmp:
        convert_float(model, None, Path(tmp) / FLOAT_TFLITE, batch=LITERT_BATCH, seq_len=seq_len)
        os.replace(Path(tmp) / FLOAT_TFLITE, out / FLOAT_TFLITE)
        for name, qp in sorted(qparams.items()):
            dev = Path(tmp) / f"{name}.float.tflite"
            weights = convert_float(model, qp, dev, batch=LITERT_BATCH, seq_len=seq_len)
            quantize_points(dev, weights, qp, out / name / TFLITE_MODEL)
            dev.unlink()


def _pid_order(pid: str):
    return (0, int(pid), "") if pid.isdigit() else (1, 0, pid)


# ------------------------------------------------------------------------------ readers

def read_fleet(device_dir) -> dict:
    """``fleet.json`` of ``device_dir``, its structure checked."""
    path = Path(device_dir) / FLEET_FILE
    if not path.is_file():
        raise DeviceDirError(f"{path}: no such file (not a device directory, or not completely written)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeviceDirError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FLEET_FORMAT:
        raise DeviceDirError(f"{path}: format is not {FLEET_FORMAT!r}")
    nodes, profiles = doc.get("nodes"), doc.get("profiles")
    if not isinstance(nodes, dict) or not isinstance(profiles, list):
        raise DeviceDirError(f"{path}: needs a 'nodes' object and a 'profiles' list")
    for pid, node in nodes.items():
        if not (isinstance(node, dict) and isinstance(node.get("profile"), str)
                and isinstance(node.get("data"), str)):
            raise DeviceDirError(f"{path}: node {pid!r} needs string 'profile' and 'data'")
        if node["profile"] not in profiles:
            raise DeviceDirError(f"{path}: node {pid!r} has profile {node['profile']!r}, not in {profiles}")
    return doc


def node_entry(device_dir, pid) -> dict:
    """fleet.json's entry for partition id ``pid`` (str or int)."""
    nodes = read_fleet(device_dir)["nodes"]
    key = str(pid)
    if key not in nodes:
        raise UnknownNode(f"{Path(device_dir) / FLEET_FILE}: no node {key!r} "
                          f"({len(nodes)} nodes: {sorted(nodes, key=_pid_order)[:5]}...)")
    return nodes[key]


def load_node_data(device_dir, pid=None, data_path=None) -> dict[str, np.ndarray]:
    """``{"train", "test"}`` int64 token ids [N, T] of node ``pid`` (its fleet.json ``data``), or
    of ``data_path`` (absolute, or relative to ``device_dir``) when given."""
    if data_path is None:
        if pid is None:
            raise DeviceDirError(f"{device_dir}: neither a partition id nor a data path")
        data_path = node_entry(device_dir, pid)["data"]
    path = Path(device_dir) / data_path  # an absolute data_path stays absolute
    if not path.is_file():
        raise DeviceDirError(f"{path}: no such file (node data)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DeviceDirError(f"{path}: not a readable npz without pickle ({e})") from None
    missing = [s for s in SPLITS if s not in arrays]
    if missing:
        raise DeviceDirError(f"{path}: lacks arrays {missing} (has {sorted(arrays)})")
    out = {}
    for s in SPLITS:
        a = arrays[s]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise DeviceDirError(f"{path}: {s!r} must be integer token ids [N, T], got {a.dtype} {a.shape}")
        out[s] = a.astype(np.int64, copy=False)
    return out


def _profile_file(device_dir, profile: str, name: str) -> Path:
    if not isinstance(profile, str) or not profile or "/" in profile or profile in (".", ".."):
        raise UnknownProfile(f"{device_dir}: {profile!r} is not a profile name")
    path = Path(device_dir) / profile / name
    if not path.is_file():
        raise UnknownProfile(f"{path}: no such file (profile {profile!r} is not installed in {device_dir})")
    return path


def load_device_profile(device_dir, profile: str) -> DeviceProfile:
    """``<device-dir>/<profile>/profile.json``; its name must be the directory's."""
    from pydantic import ValidationError

    path = _profile_file(device_dir, profile, PROFILE_FILE)
    try:
        p = DeviceProfile.model_validate_json(path.read_text())
    except ValidationError as e:
        raise DeviceDirError(f"{path}: not a DeviceProfile ({e.errors()[0]['msg']})") from None
    if p.name != profile:
        raise DeviceDirError(f"{path}: profile is named {p.name!r}, the directory {profile!r}")
    return p


def load_quant_config(device_dir, profile: str):
    """``<device-dir>/<profile>/quant_config.json`` as a quant.instrument.QuantConfig (imports torch)."""
    from pydantic import ValidationError

    from quant.instrument import QuantConfig

    path = _profile_file(device_dir, profile, QUANT_CONFIG_FILE)
    try:
        return QuantConfig.model_validate_json(path.read_text())
    except ValidationError as e:
        raise DeviceDirError(f"{path}: not a QuantConfig ({e.errors()[0]['msg']})") from None


def bundle_model(device_dir, profile: str) -> Path:
    """The device bundle's model path, checked to exist."""
    return _profile_file(device_dir, profile, MODEL_FILE)


__all__ = ["DeviceDirError", "UnknownNode", "UnknownProfile", "write_device_dir", "read_fleet",
           "node_entry", "load_node_data", "load_device_profile", "load_quant_config", "model_path",
           "bundle_model", "float_onnx_path", "torch_model_dir", "float_tflite_path", "tflite_model_path"]

"""The phone's mobile runtime: ONNX Runtime over the QDQ model (design.md section 5)."""

from __future__ import annotations

import os

import onnx


def ort_session(model, threads: int = 1, optimized_path=None, level: str = "all",
                nbits_accuracy: int = 1, weight_storage: str | None = "auto", external_dir=None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads; ``optimized_path`` writes the
    graph ORT actually runs (after QDQ fusion) for inspection.

    ``model`` is a path (one file, or a graph with its external data beside it) or a ModelProto.
    A ModelProto loaded without its external data (``quant.onnxfile.load_onnx``) needs
    ``external_dir``, the directory its data files are in; one too large to serialize in one
    piece goes through a temporary file with external data (protobuf's 2 GB limit).

    ``weight_storage`` (``choose_weight_storage``): the grid the 8-bit weights of uint8-input
    MatMuls run on. ``"auto"`` moves int8 weights to uint8 (a converted copy, same real values)
    only on a CPU whose u8 x s8 kernel saturates, so that every session is exact on every CPU;
    ``"int8"``/``"uint8"`` force a form; None runs the graph as given.

    ``nbits_accuracy``: when ORT fuses a weight DequantizeLinear + MatMul into MatMulNBits, its
    default (4) quantizes the float activations to int8 inside the kernel, silently turning a
    16-bit activation profile into 8 bits (measured 600 LSB of int16); 1 keeps them fp32.
    """
    import tempfile

    import onnxruntime as ort

    from quant.onnxfile import (EXTERNAL_THRESHOLD, data_file, external_bytes, has_external_data, load_onnx,
                                save_onnx, tensor_bytes)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(nbits_accuracy))
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if optimized_path is not None:
        so.optimized_model_filepath = os.fspath(optimized_path)
    if weight_storage is not None and (weight_storage != "auto" or u8s8_saturates()):
        from quant.qdq import set_weight_storage

        if isinstance(model, onnx.ModelProto):
            mp = onnx.ModelProto()
            mp.CopyFrom(model)
            if has_external_data(mp):
                from quant.onnxfile import load_external

                load_external(mp, external_dir)
        else:
            mp = load_onnx(model)
        if set_weight_storage(mp, choose_weight_storage(weight_storage) == "uint8"):
            model, external_dir = mp, None
        del mp
    providers = ["CPUExecutionProvider"]
    # A model with external data is mapped from its file by ORT: without prepacking (which copies
    # every weight into private memory) its weights stay file pages, shared by every process that
    # maps the same file and reclaimable. Measured on a 1 GiB MatMul: 1.05 GB private with
    # prepacking, 1.02 GB of clean file pages without. Only past EXTERNAL_THRESHOLD bytes of
    # weights: below it (SmolLM2's float graph, which the device directory always keeps with
    # external data) a session prepacks as a one-file session does, since without prepacking
    # MLAS sums in another order (SmolLM2's float perplexity moved in its 7th digit, and a run's
    # statistics with it): the same bits as before, the graph's weights still shared.
    no_prepack = {"session.disable_prepacking": "1"}
    if not isinstance(model, onnx.ModelProto):
        data = data_file(model)
        large = data.is_file() and data.stat().st_size > EXTERNAL_THRESHOLD
        return ort.InferenceSession(os.fspath(model), _options(so, no_prepack if large else {}),
                                    providers=providers)
    if has_external_data(model):
        if external_dir is None:
            raise ValueError("ort_session: the model's tensors are in external data files; "
                             "pass external_dir, the directory that holds them")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    os.fspath(external_dir))
        large = external_bytes(model) > EXTERNAL_THRESHOLD
        return ort.InferenceSession(model.SerializeToString(), _options(so, no_prepack if large else {}),
                                    providers=providers)
    if tensor_bytes(model) <= EXTERNAL_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="fedquant-ort-") as tmp:  # ORT keeps its mapping of
        path = save_onnx(model, Path(tmp) / "model.onnx")                  # the removed file
        return ort.InferenceSession(str(path), _options(so, no_prepack), providers=providers)


def release_memory() -> None:
    """Collect what was dropped and give the freed heap back to the system: glibc keeps freed
    pages otherwise, and a process then carries its largest step's memory to the end."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _options(so, entries: dict):
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    return so


# ------------------------------------------------------------------------------ device runtime
#
# What a phone holds (design.md section 5): the QDQ model, its name map, the QParams it was made
# with, the float weights/biases the integer ones are re-quantized from when a scale changes, and
# the float graph that statistics are captured on. All numpy + onnxruntime + onnx: torch stays
# out of the device path (``quant.qdq`` and ``quant.encodings``, which ``patch`` and
# ``FloatCapture`` use, import onnx and numpy only; tests/test_device_path.py).

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from quant.metrics import nll_sum_and_count  # noqa: E402
from quant.onnxfile import compact, link_file, load_onnx  # noqa: E402
from quant.qparams import (QParams, rotation_block, atomic_write_bytes, atomic_write_with, load_qparams,  # noqa: E402
                           qparams_problems, rotated_linears, save_qparams)
from quant.rotation import rotate, rotation_of  # noqa: E402
from quant.smoothing import smoothed_weight_point  # noqa: E402

BUNDLE_FORMAT = "fedquant.device/1"

# x86 CPU flags whose int8 dot product (vpdpbusd) accumulates u8 x s8 products straight into int32.
# Without one of them ONNX Runtime's x86 u8 x s8 kernels (SSE4.1/AVX2/AVX-512BW) use vpmaddubsw,
# which adds two u8 x s8 products into a *saturating* int16 (255 * -128 * 2 overflows).
X86_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
WEIGHT_STORAGES = ("auto", "int8", "uint8")


def cpu_flags() -> tuple[str, set[str]]:
    """``(machine, flags)`` of this CPU: ``platform.machine()`` and the flags of /proc/cpuinfo
    (x86 ``flags``, Arm ``Features``); empty flags where there is no /proc/cpuinfo."""
    import platform

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip().lower() in ("flags", "features"):
                flags |= set(v.split())
                break
    except OSError:
        pass
    return platform.machine(), flags


def u8s8_saturates(machine: str | None = None, flags=None) -> bool:
    """Whether ONNX Runtime's u8 x s8 integer matmul saturates on this CPU (or on ``machine`` with
    ``flags``): x86 without VNNI. ORT's own switch (``session.x64quantprecision``) asks MLAS, which
    also answers yes on AVX-512 VNNI CPUs (measured on an EPYC with avx512_vnni: it moved all 211
    SmolLM2 weights to uint8 and ran 1.85x slower), so the runtime decides from the flags instead.
    Arm's kernels widen before they add (no saturation); an x86 CPU whose flags cannot be read
    counts as saturating (the exact form is always safe)."""
    if machine is None:
        machine, flags = cpu_flags()
    m = str(machine).lower()
    if m not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not (set(flags or ()) & set(X86_VNNI_FLAGS))


def choose_weight_storage(storage: str = "auto", machine: str | None = None, flags=None) -> str:
    """``"int8"`` or ``"uint8"``: how a device stores the 8-bit weights of its uint8-input Linears
    (design.md section 3). ``"auto"``: int8 (zero point 0, the QParams' own values, ORT's fast
    u8 x s8 kernel) unless that kernel saturates on this CPU (``u8s8_saturates``), then uint8
    (``q + 128``, ORT's exact u8 x u8 kernel). The real values are the same either way."""
    if storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight storage must be one of {WEIGHT_STORAGES}, got {storage!r}")
    if storage != "auto":
        return storage
    return "uint8" if u8s8_saturates(machine, flags) else "int8"


class PatchRefused(ValueError):
    """A QParams the runtime will not load; nothing was changed."""


def weights_path(model_path) -> Path:
    """``model.onnx`` -> ``model.weights.npz``: the float weights and biases of every Linear."""
    return Path(model_path).with_suffix(".weights.npz")


def qparams_path(model_path) -> Path:
    """``model.onnx`` -> ``model.qparams.safetensors``: the QParams the model holds."""
    return Path(model_path).with_suffix(".qparams.safetensors")


def bundle_path(model_path) -> Path:
    """``model.onnx`` -> ``model.device.json``: which files make up the device bundle."""
    return Path(model_path).with_suffix(".device.json")


def save_float_linears(linears: dict, model_path) -> Path:
    """Write ``{path: (weight (out, in), bias or None)}`` (``quant.export.float_linears(model)``)
    beside the QDQ model as an npz (no pickle: plain float32 arrays, ``w:<path>`` / ``b:<path>``),
    streamed to the file: a 1.5B model's float weights are 6 GB, never one bytes object."""
    arrays = {}
    for path, (w, b) in linears.items():
        arrays[f"w:{path}"] = np.ascontiguousarray(w, np.float32)
        if b is not None:
            arrays[f"b:{path}"] = np.ascontiguousarray(b, np.float32)
    return atomic_write_with(weights_path(model_path), lambda f: np.savez(f, **arrays))


class FloatLinears(Mapping):
    """``{Linear path: (weight (out, in), bias or None)}`` of a bundle's ``model.weights.npz``,
    read from the file on each access, never all held: a patch re-quantizes one Linear at a
    time, and the float weights of a 1.5B model are 6 GB per runtime. ``shape(path)`` reads only
    the array header."""

    def __init__(self, path):
        self.path = Path(path)
        self._npz = np.load(self.path, allow_pickle=False)   # reads members on demand
        self._shapes = {}
        for k in self._npz.files:
            if k.startswith("w:"):
                with self._npz.zip.open(k + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))[0]
                self._shapes[k[2:]] = tuple(int(d) for d in shape)

    def shape(self, path: str) -> tuple[int, ...]:
        return self._shapes[path]

    def __getitem__(self, path: str):
        if path not in self._shapes:
            raise KeyError(path)
        b = f"b:{path}"
        return self._npz[f"w:{path}"], (self._npz[b] if b in self._npz.files else None)

    def __contains__(self, path) -> bool:
        # Mapping's own __contains__ reads the weight (self[path]): lm_head is 113 MB on SmolLM2,
        # and the runtime learned-range job asks for every point (422 reads a job, before this)
        return path in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def weights(self) -> "Mapping[str, np.ndarray]":
        """``{path: weight}`` read on access as well (what the server's smoothing needs)."""
        return _WeightsOnly(self)


class _WeightsOnly(Mapping):
    def __init__(self, linears: FloatLinears):
        self.linears = linears

    def __getitem__(self, path: str) -> np.ndarray:
        return self.linears[path][0]

    def __contains__(self, path) -> bool:
        return path in self.linears

    def __iter__(self):
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


class _Restricted(Mapping):
    """``linears`` restricted to ``paths``, still read on access (a patch of a few Linears)."""

    def __init__(self, linears: Mapping, paths):
        self.linears, self.paths = linears, list(paths)

    def __getitem__(self, path: str):
        if path not in self.paths:
            raise KeyError(path)
        return self.linears[path]

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def load_float_linears(path) -> FloatLinears:
    """The float weights of a bundle (``weights_path``), read on access (``FloatLinears``)."""
    return FloatLinears(path)


def save_device_bundle(model, qparams: QParams, model_path, *, float_onnx, u8_weights: bool = False,
                       weights_from=None) -> Path:
    """Export side (needs torch): write everything ``DeviceRuntime`` loads, beside ``model_path``:
    the QDQ model + name map (``quant.qdq.export_qdq``), the float weights (npz), the QParams
    (safetensors) and ``model.device.json`` naming the float graph used for statistics.
    ``weights_from``: another bundle's model path of the same model, whose float weights are
    hard-linked instead of written again (one copy per device directory, not one per profile)."""
    from quant.export import float_linears
    from quant.qdq import export_qdq

    export_qdq(model, qparams, model_path, float_onnx=float_onnx, u8_weights=u8_weights)
    if weights_from is not None:
        link_file(weights_path(weights_from), weights_path(model_path))
    else:
        save_float_linears(float_linears(model), model_path)
    save_qparams(qparams, qparams_path(model_path))
    doc = {"format": BUNDLE_FORMAT, "float_onnx": str(Path(float_onnx).resolve()),
           "u8_weights": bool(u8_weights)}
    return atomic_write_bytes(bundle_path(model_path), json.dumps(doc, indent=1).encode())


def _same(a, b) -> bool:
    """Two optional vectors (smoothing factors, importance) hold the same values."""
    return (a is None) == (b is None) and (a is None or np.array_equal(a, b))


def planned_points(qp: QParams) -> set[str]:
    """The points whose spec a mixed-precision plan chose (``meta["plan"]``, ``server.rounds``):
    the only spec changes a device takes, in either direction (a plan, or falling back from one)."""
    raw = qp.meta.get("plan")
    if not raw:
        return set()
    try:
        plan = json.loads(raw)
        return {str(k) for k in plan.get("weights8", []) + plan.get("act16", [])}
    except (ValueError, TypeError, AttributeError):
        return set()


class DeviceRuntime:
    """The integer runtime of one device: an ORT session over the QDQ model, patchable by
    QParams key, plus (lazily) the float-graph session that statistics are captured on.

    ``weight_storage`` (``choose_weight_storage``): at load the runtime moves the 8-bit weights
    to the grid that is exact and fast on this CPU (int8 with VNNI or on Arm, uint8 on x86
    without VNNI) whatever form the bundle holds; ``self.weight_storage`` says which it runs,
    ``self.u8_weights`` is what patches recompute with, ``canonical_model()`` is the model as
    exported (int8 storage, what ``export/`` ships)."""

    def __init__(self, model_path, threads: int = 1, float_onnx=None, capture: "FloatCapture | None" = None,
                 weight_storage: str = "auto"):
        from quant.qdq import load_name_map, names_path

        self.path = Path(model_path)
        self.threads = int(threads)
        meta = json.loads(bundle_path(self.path).read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{bundle_path(self.path)}: not a {BUNDLE_FORMAT} bundle")
        self.float_onnx = Path(float_onnx or meta["float_onnx"])
        if float_onnx is None and not self.float_onnx.is_file():
            # the bundle names the float graph by absolute path; a device directory moved since
            # still holds it beside its profiles (``<device-dir>/float.onnx``)
            own = self.path.parent.parent / self.float_onnx.name
            if own.is_file():
                self.float_onnx = own
        self.name_map = load_name_map(names_path(self.path))
        self.linears = load_float_linears(weights_path(self.path))
        self.qparams = load_qparams(qparams_path(self.path))
        self.model = load_onnx(self.path)
        from quant.qdq import set_weight_storage

        self.weight_storage = choose_weight_storage(weight_storage)
        want_u8 = self.weight_storage == "uint8"
        self.storage_moved = set_weight_storage(self.model, want_u8)
        if self.storage_moved:
            self.model = compact(self.model)
        self.u8_weights = want_u8
        # where the patchable initializers are; their values are read from the model when a patch
        # compares them (a second copy of every integer weight cost W/4 per runtime)
        self._index = {t.name: i for i, t in enumerate(self.model.graph.initializer) if t.name in self.name_map}
        self._session = None   # built on first use (``session``): statistics jobs never need it
        # the float graph is the same for every profile of a model: a process can share one
        # FloatCapture between its runtimes (it holds the float graph and its session)
        self._capture = capture
        self.last_patch: dict = {}

    # -------------------------------------------------------------------- patching

    def _check(self, qp: QParams) -> QParams:
        """The merged QParams ``qp`` would give, or PatchRefused naming every problem: the
        checks of ``quant.qparams.qparams_problems`` (which the server applies too before it
        commits), and smoothing only for the Linears this model has a smoothing Div for."""
        errors = qparams_problems(qp, self.qparams,
                                  {path: self._weight_shape(path)[1] for path in self.linears}, respec=True)
        if not errors:      # a new spec (a plan's) rebuilds the graph: the points must fit it
            planned = planned_points(qp) | planned_points(self.qparams)
            for key, p in qp.points.items():
                old = self.qparams.points.get(key)
                if old is not None and p.spec != old.spec and key not in planned:
                    errors.append(f"{key}: spec {p.spec.short()} differs from the runtime's {old.spec.short()} "
                                  "(a different profile needs a different model; a plan names the points it "
                                  "changes in meta['plan'])")
                elif old is not None and p.spec != old.spec:
                    path = key.rsplit(":", 1)[0]
                    try:
                        want = p.spec.param_shape(self._weight_shape(path) if key.endswith(":weight") else ())
                    except (KeyError, ValueError) as e:
                        errors.append(f"{key}: spec {p.spec.short()} does not fit the point ({e})")
                        continue
                    if p.scale.shape != want:
                        errors.append(f"{key}: scale shape {p.scale.shape} != {want} of spec {p.spec.short()}")
        unknown_s = sorted(set(qp.smoothing) - set(self.qparams.smoothing))
        if unknown_s:
            errors.append(f"smoothing for Linears the model has no smoothing Div for: {unknown_s[:5]}")
        unknown_i = sorted(set(qp.importance) - {k.rsplit(":", 1)[0] for k in self.qparams.points
                                                 if k.endswith(":weight")})
        if unknown_i:
            errors.append(f"importance for Linears without a weight point: {unknown_i[:5]}")
        if errors:
            raise PatchRefused("QParams refused: " + "; ".join(errors))
        points = {**self.qparams.points, **self._folded(qp), **qp.points}
        smoothing = {**self.qparams.smoothing, **qp.smoothing}
        # held codes stay with their point only while neither it nor the Linear's factors change
        kept = {k: c for k, c in self.qparams.codes.items() if k not in qp.codes and points[k] is self.qparams.points[k]
                and _same(smoothing.get(k.rsplit(":", 1)[0]), self.qparams.smoothing.get(k.rsplit(":", 1)[0]))}
        return QParams(points, self.qparams.model or qp.model,
                       int(qp.version), smoothing,
                       {**self.qparams.meta, **qp.meta}, {**self.qparams.importance, **qp.importance},
                       {**kept, **qp.codes})

    def _folded(self, qp: QParams) -> dict:
        """The weight points of the Linears whose smoothing or importance ``qp`` changes without
        sending their weight point: derived here from the device's own float weights
        (``quant.smoothing.smoothed_weight_point``), the same bits the server derives, so a round's
        instruction carries no weight scales."""
        out = {}
        held_m, held_h = self.qparams.smoothing, self.qparams.importance
        for path in sorted(set(qp.smoothing) | set(qp.importance)):
            key = f"{path}:weight"
            m, h = qp.smoothing.get(path, held_m.get(path)), qp.importance.get(path, held_h.get(path))
            if key in qp.points or key not in self.qparams.points or path not in self.linears \
                    or (_same(held_m.get(path), m) and _same(held_h.get(path), h)):
                continue
            out[key] = smoothed_weight_point(self.linears[path][0], m, self.qparams.points[key].spec,
                                             rotation_block(self.qparams, path), h)
        return out

    def _affected(self, merged: QParams) -> tuple[QParams, "Mapping"]:
        """The part of ``merged`` that differs from the held QParams, widened to whole Linears
        (a changed ``s_x`` moves the int32 bias, a changed ``s_w`` the weight and the bias), and
        those Linears' float weights, read on access: what ``iter_qdq_values`` must recompute."""
        held = self.qparams

        def same(a, b):
            return b is not None and a.spec == b.spec and np.array_equal(a.scale, b.scale) \
                and np.array_equal(a.zero_point, b.zero_point)

        paths = {k.rsplit(":", 1)[0] for k, p in merged.points.items() if not same(p, held.points.get(k))}
        paths |= {n for n, m in merged.smoothing.items()
                  if not np.array_equal(m, held.smoothing.get(n, np.empty(0)))}
        paths |= {k.rsplit(":", 1)[0] for k in set(merged.codes) | set(held.codes)
                  if not _same(merged.codes.get(k), held.codes.get(k))}
        points = {k: p for k, p in merged.points.items() if k.rsplit(":", 1)[0] in paths}
        sub = QParams(points, merged.model, merged.version,
                      {n: m for n, m in merged.smoothing.items() if n in paths}, dict(merged.meta),
                      {n: h for n, h in merged.importance.items() if n in paths},
                      {k: c for k, c in merged.codes.items() if k.rsplit(":", 1)[0] in paths})
        return sub, _Restricted(self.linears, [p for p in self.linears if p in paths])

    def _changed_initializers(self, sub: QParams, linears) -> dict:
        """``{name: TensorProto}`` of the initializers whose values ``sub`` changes, computed one
        Linear at a time (its float weight read, its values compared with the model's, only the
        changed ones kept), so a patch never holds every float weight, nor every integer one
        twice. PatchRefused for values the model has no place for."""
        from onnx import numpy_helper

        from quant.qdq import iter_qdq_values

        changed, missing = {}, []
        try:
            for values, _ in iter_qdq_values(sub, linears, self.u8_weights):
                for n, v in values.items():
                    if n not in self._index:
                        missing.append(n)
                        continue
                    old = self._initializer(n)
                    if v.shape != old.shape:
                        raise PatchRefused(f"QParams refused: {n}: shape {v.shape} != {old.shape}")
                    v = np.asarray(v).astype(old.dtype)
                    if not np.array_equal(v, old):
                        changed[n] = numpy_helper.from_array(v, n)
                del values
        except PatchRefused:
            raise
        except ValueError as e:
            raise PatchRefused(f"QParams refused: {e}") from None
        if missing:
            raise PatchRefused(f"QParams refused: they need initializers the model lacks: {sorted(missing)[:5]}")
        return changed

    def patch(self, qparams: QParams) -> dict:
        """Load ``qparams`` (all points or some; keys must be the model's, version not older):
        overwrite the changed scales/zero-points and re-quantize the weights and int32 biases
        that depend on them, then rebuild the session if the runtime has one (else it is built
        on first use). All checks run first and a failure while rebuilding keeps the old model
        and session, so a refused patch changes nothing. Returns
        timings ``{changed, compute_s, patch_s, session_s, total_s}`` (also ``last_patch``).

        Memory: the new model is built beside the old one (``quant.qdq.with_initializers``), one
        Linear's float weight at a time; the old session goes before the new one is made."""
        from quant.qdq import with_initializers

        t0 = time.perf_counter()
        merged = self._check(qparams)
        if any(p.spec != self.qparams.points[k].spec for k, p in merged.points.items() if k in self.qparams.points):
            return self._rebuild(merged, t0)
        sub, linears = self._affected(merged)
        changed = self._changed_initializers(sub, linears)
        t1 = time.perf_counter()
        n_changed = len(changed)
        if not changed:  # same values (e.g. a version bump only): keep the session
            self.qparams = merged
            self.last_patch = {"changed": 0, "compute_s": t1 - t0, "patch_s": 0.0,
                               "session_s": 0.0, "total_s": t1 - t0}
            return self.last_patch
        model = with_initializers(self.model, changed)   # same initializers in the same order: _index holds
        del changed
        t2 = time.perf_counter()
        self._swap_session(model)
        self.model = model
        t3 = time.perf_counter()
        self.qparams = merged
        self.last_patch = {"changed": n_changed, "compute_s": t1 - t0, "patch_s": t2 - t1,
                           "session_s": t3 - t2, "total_s": t3 - t0}
        return self.last_patch

    def _rebuild(self, merged: QParams, t0: float) -> dict:
        """A patch that changes specs (a mixed-precision plan: a weight to 8 bits, an activation to
        int16): the QDQ graph's structure depends on them (MatMulNBits for 4-bit weights, the Q/DQ
        types), so the graph is built again from the float graph and the device's float weights
        (``quant.qdq.export_qdq``, no torch), then moved to this CPU's weight storage. A failure
        leaves the runtime as it was."""
        import tempfile

        from quant.qdq import export_qdq, set_weight_storage

        try:
            with tempfile.TemporaryDirectory(prefix=".rebuild-", dir=self.path.parent) as tmp:
                name_map = export_qdq(self.linears, merged, Path(tmp) / "model.onnx", float_onnx=self.float_onnx)
                model = load_onnx(Path(tmp) / "model.onnx")
        except ValueError as e:
            raise PatchRefused(f"QParams refused: rebuilding the graph for their specs: {e}") from None
        if set_weight_storage(model, self.u8_weights):
            model = compact(model)
        t1 = time.perf_counter()
        self._swap_session(model)
        self.model, self.qparams = model, merged
        self.name_map = {k: tuple(v) for k, v in name_map.items()}
        self._index = {t.name: i for i, t in enumerate(self.model.graph.initializer) if t.name in self.name_map}
        t2 = time.perf_counter()
        self.last_patch = {"changed": len(self._index), "rebuilt": 1, "compute_s": t1 - t0, "patch_s": 0.0,
                           "session_s": t2 - t1, "total_s": t2 - t0}
        return self.last_patch

    def _swap_session(self, model) -> None:
        """The session of ``model`` in place of the current one, built only if there is one (a
        runtime that has only served statistics has none to rebuild). The old session goes before
        the new one is built, one at a time in memory; if ORT cannot build it, the old one comes
        back and the error is raised (the caller then keeps its old model)."""
        if self._session is None:
            return
        self._session = None
        try:
            self._session = ort_session(model, threads=self.threads, weight_storage=None)
        except Exception:
            self._session = ort_session(self.model, threads=self.threads, weight_storage=None)
            raise

    @property
    def session(self):
        """The ORT session of the integer model, built on first use."""
        if self._session is None:
            self._session = ort_session(self.model, threads=self.threads, weight_storage=None)
        return self._session

    def release(self, session: bool = False, capture: bool = False) -> bool:
        """Drop the integer session and/or this runtime's reference to the float capture (both are
        built again on use): what a process running another kind of job does not need to hold.
        True if something was held."""
        held = (session and self._session is not None) or (capture and self._capture is not None)
        if session:
            self._session = None
        if capture:
            self._capture = None
        return held

    def _initializer(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.model.graph.initializer[self._index[name]])

    def canonical_model(self):
        """The model with its 8-bit weights in the exported form (int8, the QParams' zero points):
        ``self.model`` itself when the runtime runs that form, else a converted copy."""
        if not self.u8_weights:
            return self.model
        import onnx

        from quant.qdq import set_weight_storage

        mp = onnx.ModelProto()
        mp.CopyFrom(self.model)
        set_weight_storage(mp, False)
        return mp

    # -------------------------------------------------------------------- inference

    def logits(self, ids) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def evaluate(self, sequences, batch_size: int = 8) -> tuple[float, int]:
        """(summed next-token NLL, predicted tokens) over ``sequences`` [N, T], batch by batch."""
        seqs = np.asarray(sequences, dtype=np.int64)
        total, count = 0.0, 0
        for i in range(0, len(seqs), batch_size):
            ids = seqs[i:i + batch_size]
            s, c = nll_sum_and_count(self.logits(ids), ids)
            total, count = total + s, count + c
        return total, count

    # -------------------------------------------------------------------- statistics

    @property
    def capture(self) -> "FloatCapture":
        if self._capture is None:
            self._capture = FloatCapture(self.float_onnx, threads=self.threads)
        return self._capture

    def logits_width(self) -> int:
        """The vocabulary the logits span (lm_head's rows, else the widest Linear), from the
        weights' headers alone."""
        if "lm_head" in self.linears:
            return self._weight_shape("lm_head")[0]
        return max(self._weight_shape(p)[0] for p in self.linears)

    def _weight_shape(self, path: str) -> tuple[int, ...]:
        """A Linear's weight shape without reading the weight (``FloatLinears``; a plain dict of
        arrays works too)."""
        if isinstance(self.linears, FloatLinears):
            return self.linears.shape(path)
        return tuple(np.shape(self.linears[path][0]))

    def activation_keys(self) -> list[str]:
        return sorted(k for k in self.qparams.points if not k.endswith(":weight"))

    def activation_widths(self) -> dict[str, int]:
        """Last-axis width of each activation point the weights tell (Linear inputs)."""
        return {k: self._weight_shape(k.rsplit(":", 1)[0])[1] for k in self.activation_keys()
                if k.endswith(":input") and k.rsplit(":", 1)[0] in self.linears}

    def float_activations(self, ids, keys, rotated: bool = True):
        """``{key: float32 input of the point}`` for one batch, from the float graph, divided by
        the held smoothing factors where a Linear has them and, unless not ``rotated``, rotated
        where its static input is (``quant.qparams.rotated_linears``): what the point quantizes,
        and what QuantLinear's capture sees. Scouting asks for the unrotated input (SmoothQuant's
        per-channel abs-max is of the input's own channels)."""
        return self.capture.run(ids, keys, self.qparams.smoothing, rotated_blocks(self.qparams) if rotated else None)


class FloatCapture:
    """The float ONNX graph with the float input of quantization points exposed as extra outputs
    (exposing them on the QDQ graph would break ORT's QDQ fusion, design.md section 5). One
    session per set of exposed tensors, built on first use; run one batch at a time."""

    def __init__(self, float_onnx, threads: int = 1):
        from quant.encodings import onnx_encoding_names

        # the graph without its external tensors (all of it for a one-file model): sessions
        # read the weights from disk, Python never holds a second copy of them
        self.model = load_onnx(float_onnx, load_external_data=False)
        self.external_dir = Path(float_onnx).parent
        self.threads = threads
        self.tensors = {k: v for k, v in onnx_encoding_names(self.model).items()
                        if not k.endswith(":weight")}
        self._sessions: dict[tuple[str, ...], object] = {}

    def session(self, names: tuple[str, ...]):
        if names not in self._sessions:
            import onnx

            from quant.export import prune_unused
            from quant.qdq import add_outputs

            mp = onnx.ModelProto()
            mp.CopyFrom(self.model)
            del mp.graph.output[:]  # only the exposed tensors: the lm_head and softmax are pruned
            add_outputs(mp, names)
            prune_unused(mp.graph)
            self._sessions = {names: ort_session(mp, threads=self.threads, weight_storage=None,  # keep one
                                                 external_dir=self.external_dir)}
        return self._sessions[names]

    def run(self, ids, keys, smoothing=None, rotation=None) -> dict[str, np.ndarray]:
        unknown = [k for k in keys if k not in self.tensors]
        if unknown:
            raise ValueError(f"not activation points of the float graph: {unknown[:5]}")
        if not keys:        # a graph with no output is pruned to nothing, which ORT refuses obscurely
            return {}
        names = tuple(sorted({self.tensors[k] for k in keys}))
        outs = self.session(names).run(list(names), {"input_ids": np.asarray(ids, dtype=np.int64)})
        return captured_by_key(dict(zip(names, outs)), self.tensors, keys, smoothing, rotation)


def rotated_blocks(qp: QParams) -> dict[str, int]:
    """Linear path -> rotation block of each Linear whose static input is rotated (the meta read
    once: this runs for every batch a job captures)."""
    block = rotation_of(qp.meta)
    return {p: block for p in rotated_linears(qp)}


def captured_by_key(by_name: dict, tensors: dict, keys, smoothing=None, rotation=None) -> dict[str, np.ndarray]:
    """The captured tensors (graph name -> array) as activation points (``tensors``: key -> graph
    name), a smoothed Linear's input divided by its factors and a rotated one's then rotated
    (``rotation``: path -> block, ``quant.rotation.rotate``), as the QDQ model quantizes it."""
    got = {}
    for k in keys:
        x = by_name[tensors[k]]
        path = k.rsplit(":", 1)[0]
        m = (smoothing or {}).get(path) if k.endswith(":input") else None
        x = x if m is None else x / np.asarray(m, np.float32)
        b = (rotation or {}).get(path) if k.endswith(":input") else None
        got[k] = rotate(x, b) if b else x
    return got

"""QParams as AIMET/QNN encodings JSON (format 0.6.1), the file a Qualcomm toolchain consumes
(design.md section 8): ``activation_encodings`` and ``param_encodings``, each tensor name -> one
encoding per channel with bitwidth, scale, offset, min, max, is_symmetric and dtype.

Tensor names are the QParams keys (``encoding_names``) or, for a consumer that quantizes the float
graph of ``quant.export`` itself, that graph's tensor names (``onnx_encoding_names``).

An encoding is of what its point quantizes: a smoothed Linear's input ``x / m`` and weight
``W * m`` (``QParams.smoothing``), a rotated one's ``(x / m) R`` and ``(W * m) R``
(``quant.qparams.rotated_linears``, ``quant.rotation``). A consumer of the float graph's names
must apply the factors and the rotation itself; the QDQ model of ``quant.qdq`` has both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from quant.export import MATMUL_TAG, node_tag
from quant.qparams import PointParams, QParams, atomic_write_bytes


def _aimet_entries(p: PointParams) -> list[dict]:
    """AIMET encodings express every tensor on an unsigned grid ``[0, 2^b - 1]``:
    ``real = (q_u + offset) * scale``. With ours ``real = (q - z) * s`` and ``q_u = q - qmin``,
    ``offset = qmin - z``: ``-z`` for unsigned storage, ``-2^(b-1) - z`` for signed (so a symmetric
    int8 weight has offset -128, as AIMET writes it). min/max are the grid's ends."""
    spec = p.spec
    s = np.asarray(p.scale, np.float32).reshape(-1)
    off = spec.qmin - np.asarray(p.zero_point, np.int64).reshape(-1)
    span = 2**spec.bits - 1
    return [{"bitwidth": spec.bits, "dtype": "int", "is_symmetric": str(spec.symmetric),
             "scale": float(si), "offset": int(oi), "min": float(np.float32(oi) * si),
             "max": float(np.float32(oi + span) * si)} for si, oi in zip(s, off)]


def encoding_names(qparams: QParams) -> dict[str, str]:
    """Default tensor names: the QParams key for an activation, ``<path>.weight`` (the torch
    parameter name, as AIMET's torch export uses) for a weight."""
    return {k: (k.rsplit(":", 1)[0] + ".weight" if k.endswith(":weight") else k)
            for k in qparams.points}


def onnx_encoding_names(float_mp: onnx.ModelProto) -> dict[str, str]:
    """QParams key -> tensor name in a float graph from ``export_float_onnx``: the MatMul's
    activation input and its weight initializer ``<path>.weight_t``, for a QNN/AIMET consumer that
    quantizes the float graph itself. q/k/v (and gate/up) share one input tensor, so their
    ``:input`` encodings land on one name: give them equal parameters."""
    out = {}
    for n in float_mp.graph.node:
        path, mm = node_tag(n), node_tag(n, MATMUL_TAG)
        if path and n.op_type == "MatMul":
            out[f"{path}:input"], out[f"{path}:weight"] = n.input[0], n.input[1]
        if mm:
            out[f"{mm}:input"], out[f"{mm}:other"] = n.input[0], n.input[1]
    return out


def write_encodings_json(qparams: QParams, path, names: dict[str, str] | None = None) -> Path:
    """Write AIMET/QNN encodings (format 0.6.1): ``activation_encodings`` and ``param_encodings``,
    each ``name -> [encoding per channel]``. ``names`` maps QParams keys to tensor names (e.g. the
    float ONNX graph's), default ``encoding_names``. Per-group weights are written as one flat
    list in (out, group) row-major order, which the 0.6.1 format has no field to describe."""
    if qparams.codes:   # encodings carry ranges only: a consumer would round to the nearest
        raise ValueError(f"QParams carry the codes of {len(qparams.codes)} weights ({sorted(qparams.codes)[0]}, ...): "
                         "encodings hold ranges, not integer weights; export the ONNX model instead")
    names = {**encoding_names(qparams), **(names or {})}
    act, par = {}, {}
    for key, p in sorted(qparams.points.items()):
        (par if key.endswith(":weight") else act)[names[key]] = _aimet_entries(p)
    doc = {"version": "0.6.1", "activation_encodings": act, "param_encodings": par,
           "excluded_layers": [], "quantizer_args": {}}
    return atomic_write_bytes(path, json.dumps(doc, indent=1).encode())


def read_encodings_json(path, like: QParams, names: dict[str, str] | None = None) -> QParams:
    """Read encodings back into QParams with the specs (and model, version) of ``like``:
    ``z = qmin - offset``. Signedness is a storage choice the format does not record."""
    doc = json.loads(Path(path).read_text())
    names = {**encoding_names(like), **(names or {})}
    pts = {}
    for key, p in like.points.items():
        sec = doc["param_encodings" if key.endswith(":weight") else "activation_encodings"]
        ents = sec[names[key]]
        s = np.array([e["scale"] for e in ents], np.float32).reshape(p.scale.shape)
        z = (p.spec.qmin - np.array([e["offset"] for e in ents], np.int64)).reshape(p.scale.shape)
        pts[key] = PointParams(p.spec, s, z)
    return QParams(pts, like.model, like.version, dict(like.smoothing), dict(like.meta), dict(like.importance))

"""The QDQ model a phone runs, and the values inside it (design.md sections 3 and 5).

- ``export_qdq``: the float graph of ``quant.export`` with QuantizeLinear/DequantizeLinear on the
  activation input of every Linear (static, per tensor), integer weights behind a DequantizeLinear
  (per tensor, per channel, or blocked per group), an int32 bias with scale ``s_x * s_w``,
  SmoothQuant factors as a Div before the input's QuantizeLinear, and, when QParams has
  quant.instrument's attention points (``<attn>.qk_matmul:input`` / ``:other``,
  ``<attn>.av_matmul:...``), QDQ on both operands of the two attention matmuls (exported as HF
  eager attention). MatMul outputs stay float. Every scale, zero-point and integer tensor is a
  named initializer, and a name map ``{initializer: (qparams key, kind)}`` written beside the model
  lets a client patch by key.
- ``qdq_values`` + ``patch_initializers``: the same initializer values recomputed for new QParams
  and written into a loaded model by name, which is how a client patches without exporting again.

The QDQ graph is built by our own graph surgery, not by ``onnxruntime.quantization``: that tool
computes weight parameters itself, names tensors after the exporter's meaningless names, and has
no int32 bias for MatMul + Add; the surgery here is a few dozen lines and exact by construction.

onnx and numpy only at module load (torch only to trace a model in ``export_qdq``): the device path
imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quant.affine import dequantize, quantize, range_to_qparams, tensor_range
from quant.export import (LINEAR_TAG, MATMUL_TAG, OPSET, embedding_gathers, float_graph, float_linears,
                          linear_paths, matmul_paths, node_tag, prune_unused)
from quant.onnxfile import EXTERNAL_THRESHOLD, copy_fields, load_external, load_onnx, save_onnx
from quant.qparams import QParams, atomic_write_bytes, per_token_linears, rotation_block
from quant.rotation import block_for, hadamard, rotate, rotation_of, signs
from quant.spec import QuantSpec, weight_spec

# what a name map entry ``(qparams key, kind)`` says an initializer holds
KINDS = ("scale", "zero_point", "weight_q", "bias_q", "bias_scale", "smoothing")


# --------------------------------------------------------------------------- QDQ values


@dataclass
class _Plan:
    """What one Linear becomes: initializer values by name, and the DequantizeLinear attributes."""

    values: dict[str, np.ndarray]
    names: dict[str, tuple[str, str]]  # initializer -> (qparams key, kind)
    w_attrs: dict
    b_attrs: dict
    rotation: tuple[int, int] = (0, 0)   # (input width, block) of a rotated Linear (quant.rotation)


def _storage(a, spec: QuantSpec) -> np.ndarray:
    """Cast integers to the storage dtype ONNX wants (ml_dtypes int4/uint4 for 4 bits)."""
    a = np.asarray(a)
    if spec.bits == 4:
        import ml_dtypes

        return a.astype(np.int8 if spec.signed else np.uint8).astype(
            ml_dtypes.int4 if spec.signed else ml_dtypes.uint4)
    return a.astype(spec.numpy_dtype)


def bias_quant(b: np.ndarray, s_x, s_w) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its scale ``s_x * s_w`` (float32), z = 0 (design.md section 3)."""
    bs = (np.float32(s_x) * np.asarray(s_w, np.float32)).astype(np.float32)
    q = np.rint(b.astype(np.float32) / bs).astype(np.float64)
    return np.clip(q, -2**31, 2**31 - 1).astype(np.int32), bs


def dequantized_weight(path: str, qparams: QParams, w: np.ndarray) -> np.ndarray:
    """The weight (torch layout) the QDQ graph computes with: ``dequantize(quantize(w))``, or of
    the QParams' codes when they carry the point's."""
    p = qparams.points[f"{path}:weight"]
    q = qparams.codes.get(f"{path}:weight")
    return dequantize(quantize(w, p.scale, p.zero_point, p.spec) if q is None else q, p.scale, p.zero_point, p.spec)


def _plan(path: str, w: np.ndarray, b: np.ndarray | None, qp: QParams, u8_weights: bool,
          per_token: bool = False) -> _Plan:
    values, names, w_attrs, b_attrs = {}, {}, {}, {}
    ki, kw = f"{path}:input", f"{path}:weight"
    pi, pw = qp.points.get(ki), qp.points.get(kw)
    m = qp.smoothing.get(path)
    if m is not None:  # SmoothQuant, as QuantLinear computes it: F.linear(fq(x / m), fq(W * m), b)
        m = np.asarray(m, np.float32)
        if m.shape != (w.shape[1],):
            raise ValueError(f"smoothing {path}: {m.shape[0]} factors for {w.shape[1]} inputs")
        w = w * m
        values[f"{path}.input.smooth"] = m
        names[f"{path}.input.smooth"] = (path, "smoothing")
    rotation = (int(w.shape[1]), block_for(int(w.shape[1]), rotation_block(qp, path)))
    if rotation[1]:   # quant.rotation: W * m, then R (the graph rotates x: _rotation_nodes)
        w = rotate(w, rotation[1])
    if pi is not None:
        _act_point(f"{path}.input", ki, qp, values, names)
    if pw is not None:
        spec = pw.spec
        q = qp.codes.get(kw)    # GPTQ's rounding, when the QParams carry it (quant.gptq)
        if q is None:
            q = quantize(w, pw.scale, pw.zero_point, spec)  # torch layout (out, in): the nearest
        elif q.shape != w.shape:
            raise ValueError(f"codes {kw}: shape {q.shape}, the weight is {w.shape}")
        s, z = np.asarray(pw.scale, np.float32), np.asarray(pw.zero_point)
        if spec.granularity == "per_channel":
            w_attrs["axis"] = 1 - spec.resolved_axis(2)  # ONNX weight is the transpose
        elif spec.granularity == "per_group":
            w_attrs["axis"] = 1 - spec.resolved_axis(2)
            w_attrs["block_size"] = spec.group_size
            s, z = s.T, z.T
        q, z = _storage(np.ascontiguousarray(q.T), spec), _storage(np.ascontiguousarray(z), spec)
        if u8_weights and spec.bits == 8 and spec.signed and (per_token or (
                pi is not None and not pi.spec.signed and pi.spec.bits == 8)):
            # Same real values on the uint8 grid (q + 128, z + 128): ORT's x86 u8s8 kernels
            # (AVX2 without VNNI) saturate int16 pair sums, its u8u8 kernels are exact.
            q, z = (q.astype(np.int16) + 128).astype(np.uint8), (z.astype(np.int16) + 128).astype(np.uint8)
        values[f"{path}.weight.q"] = q
        values[f"{path}.weight.scale"] = np.ascontiguousarray(s)
        values[f"{path}.weight.zero_point"] = z
        names[f"{path}.weight.q"] = (kw, "weight_q")
        names[f"{path}.weight.scale"] = (kw, "scale")
        names[f"{path}.weight.zero_point"] = (kw, "zero_point")
        # int32 bias needs one weight scale per output: per tensor, or per channel along out.
        per_out = spec.granularity == "per_tensor" or (
            spec.granularity == "per_channel" and spec.resolved_axis(2) == 0)
        if b is not None and pi is not None and per_out:
            bq, bs = bias_quant(b, pi.scale, pw.scale)
            values[f"{path}.bias.q"] = bq
            values[f"{path}.bias.scale"] = bs
            names[f"{path}.bias.q"] = (kw, "bias_q")
            names[f"{path}.bias.scale"] = (kw, "bias_scale")
            if bs.ndim == 1:
                b_attrs["axis"] = 0
    return _Plan(values, names, w_attrs, b_attrs, rotation)


def qdq_values(qparams: QParams, linears: dict, u8_weights: bool = False
               ) -> tuple[dict[str, np.ndarray], dict]:
    """All QDQ initializer values and the name map for ``qparams`` and the float weights
    ``linears`` (from ``float_linears``). A client that changes QParams recomputes these and
    overwrites the initializers by name (``patch_initializers``): weights and the int32 bias
    follow every change of ``s_x`` or ``s_w`` (a stale bias drifts, design.md section 3)."""
    values, names = {}, {}
    for v, n in iter_qdq_values(qparams, linears, u8_weights):
        values.update(v)
        names.update(n)
    return values, names


def iter_qdq_values(qparams: QParams, linears, u8_weights: bool = False):
    """``qdq_values`` one Linear at a time: yields ``(values, names)`` of each Linear of
    ``linears`` (a mapping read on access: ``client.runtime.FloatLinears`` reads a weight from
    its file only then), then of the attention operands. A patch that consumes them as they come
    never holds every float or integer weight of the model at once (a 1.5B model's float
    weights are 7 GB)."""
    per_token = set(per_token_linears(qparams))
    for path in linears:
        w, b = linears[path]
        p = _plan(path, w, b, qparams, u8_weights, path in per_token)
        del w, b
        yield p.values, p.names
    values, names = {}, {}
    for key in qparams.points:  # attention matmul operands
        path, kind = key.rsplit(":", 1)
        if path not in linears:
            _act_point(f"{path}.{kind}", key, qparams, values, names)
    yield values, names


# ------------------------------------------------------------------------ token embedding
#
# The embedding table is as large as lm_head (SmolLM2: 49152 x 576, 113 MB in float32). A tied
# embedding reads lm_head's own integer weights (one copy in the file, patched with lm_head):
# row r of the table is ``(q_r - z_r) * s_r / m`` with lm_head's per-row int8 weight, scale, zero
# point and SmoothQuant factors ``m`` (lm_head quantizes ``W * m``). A per-token lm_head stores
# ``(W * m) R`` (``quant.rotation``): its rows are rotated back first, ``(q_r - z_r) s_r R^T / m``
# (a Reshape, a MatMul by the Hadamard block and the signs: 64 multiply-adds per value on
# SmolLM2, against 28 MB of rows of its own). An untied one (or a tied one whose lm_head is not
# 8-bit per row) gets its own int8 table with per-row min-max scales from the float table: not a
# QParams point, since no round changes it.

EMBEDDING_SPEC = weight_spec(8)
BARRIER_LOWEST = "fedquant.lowest_float"  # the float32 lowest value, for the MatMulNBits barrier


def _shared_head(table: np.ndarray, linears: dict, qp: QParams) -> tuple[str, int] | None:
    """The Linear whose 8-bit per-row (int8 or uint8) quantized weight equals ``table`` (a tied
    lm_head) and the rotation block of its stored rows (0: none; a rotated Linear's weight is
    stored rotated, ``_plan``), or None."""
    for path, (w, _) in linears.items():
        p = qp.points.get(f"{path}:weight")
        if p is None or w.shape != table.shape or not np.array_equal(w, table):
            continue
        if p.spec.bits == 8 and p.spec.granularity == "per_channel" and p.spec.resolved_axis(2) == 0:
            block = block_for(table.shape[1], rotation_block(qp, path))
            return path, block
    return None


def own_embedding_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The embedding's own int8 rows and their per-row min-max scales (symmetric: zero point 0)."""
    s, z = range_to_qparams(*tensor_range(table, EMBEDDING_SPEC), EMBEDDING_SPEC)
    return quantize(table, s, z, EMBEDDING_SPEC).astype(np.int8), np.asarray(s, np.float32)


def embedding_table(table: np.ndarray, linears: dict, qp: QParams, share: bool = True) -> np.ndarray:
    """The float32 table the QDQ graph's embedding computes (``export_qdq``'s ``embedding="int8"``,
    or ``"int8-own"`` when not ``share``): what a torch reference puts in place of the float
    embedding to compute what the device computes."""
    shared = _shared_head(table, linears, qp) if share else None
    if shared is None:
        q, s = own_embedding_rows(table)
        return q.astype(np.float32) * s.reshape(-1, 1)
    head, block = shared
    m = qp.smoothing.get(head)
    w = table if m is None else table * np.asarray(m, np.float32)
    t = dequantized_weight(head, qp, rotate(w, block) if block else w)
    t = rotate(t, block, inverse=True) if block else t
    return t if m is None else t / np.asarray(m, np.float32)


def _embedding_nodes(node, path: str, table: np.ndarray, linears: dict, qp: QParams,
                     plans: dict, share: bool = True) -> tuple[list, dict]:
    """Nodes computing ``node``'s output (a Gather of the float table by ``input_ids``) from an int8
    table (a tied lm_head's rows unless not ``share``), and the new initializers."""
    ids, out, pre = node.input[1], node.output[0], f"{path}.embedding"
    shared = _shared_head(table, linears, qp) if share else None
    mk = helper.make_node
    if shared is None:
        q, s = own_embedding_rows(table)
        inits = {f"{path}.weight.q": q, f"{path}.weight.scale": s}
        nodes = [mk("Gather", [f"{path}.weight.q", ids], [f"{pre}.q"], name=f"{pre}.Gather", axis=0),
                 mk("Cast", [f"{pre}.q"], [f"{pre}.qf"], name=f"{pre}.Cast", to=TensorProto.FLOAT),
                 mk("Gather", [f"{path}.weight.scale", ids], [f"{pre}.s"], name=f"{pre}.GatherScale", axis=0),
                 mk("Unsqueeze", [f"{pre}.s", f"{pre}.last"], [f"{pre}.s1"], name=f"{pre}.Unsqueeze"),
                 mk("Mul", [f"{pre}.qf", f"{pre}.s1"], [out], name=f"{pre}.Mul")]
        return nodes, {**inits, f"{pre}.last": np.array([-1], np.int64)}
    # lm_head's weight is stored (in, out): gather columns, then put the hidden axis last
    head, block = shared
    hq, hs, hz = f"{head}.weight.q", f"{head}.weight.scale", f"{head}.weight.zero_point"
    m = f"{head}.input.smooth" if f"{head}.input.smooth" in plans[head].values else None
    inits = {f"{pre}.last": np.array([-1], np.int64)}
    nodes = [mk("Gather", [hq, ids], [f"{pre}.qt"], name=f"{pre}.Gather", axis=1),
             mk("Transpose", [f"{pre}.qt"], [f"{pre}.q"], name=f"{pre}.Transpose", perm=[1, 2, 0]),
             mk("Cast", [f"{pre}.q"], [f"{pre}.qf"], name=f"{pre}.Cast", to=TensorProto.FLOAT),
             mk("Gather", [hz, ids], [f"{pre}.z"], name=f"{pre}.GatherZero", axis=0),
             mk("Cast", [f"{pre}.z"], [f"{pre}.zf"], name=f"{pre}.CastZero", to=TensorProto.FLOAT),
             mk("Unsqueeze", [f"{pre}.zf", f"{pre}.last"], [f"{pre}.z1"], name=f"{pre}.UnsqueezeZero"),
             mk("Sub", [f"{pre}.qf", f"{pre}.z1"], [f"{pre}.c"], name=f"{pre}.Sub"),
             mk("Gather", [hs, ids], [f"{pre}.s"], name=f"{pre}.GatherScale", axis=0),
             mk("Unsqueeze", [f"{pre}.s", f"{pre}.last"], [f"{pre}.s1"], name=f"{pre}.Unsqueeze"),
             mk("Mul", [f"{pre}.c", f"{pre}.s1"], [f"{pre}.d" if m or block else out], name=f"{pre}.Mul")]
    if block:   # the rows are (W * m) R: back to the hidden channels, (rows in blocks @ H) * D
        n, r = table.shape[1], f"fedquant.rotation.{table.shape[1]}x{block}"
        inits |= {f"{r}.signs": signs(n), f"{r}.hadamard": hadamard(block).astype(np.float32),
                  f"{r}.blocks": np.array([-1, n // block, block], np.int64)}
        nodes += [mk("Shape", [f"{pre}.d"], [f"{pre}.shape"], name=f"{pre}.Shape"),
                  mk("Reshape", [f"{pre}.d", f"{r}.blocks"], [f"{pre}.blocks"], name=f"{pre}.ToBlocks"),
                  mk("MatMul", [f"{pre}.blocks", f"{r}.hadamard"], [f"{pre}.hb"], name=f"{pre}.Hadamard"),
                  mk("Reshape", [f"{pre}.hb", f"{pre}.shape"], [f"{pre}.hd"], name=f"{pre}.FromBlocks"),
                  mk("Mul", [f"{pre}.hd", f"{r}.signs"], [f"{pre}.u" if m else out], name=f"{pre}.Signs")]
    if m:
        nodes.append(mk("Div", [f"{pre}.u" if block else f"{pre}.d", m], [out], name=f"{pre}.Div"))
    return nodes, inits


# ---------------------------------------------------------------------------- QDQ export


def _to_tensor(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a), name)


def _act_point(prefix: str, key: str, qp: QParams, values: dict, names: dict) -> None:
    """Scale and zero-point initializers ``<prefix>.scale`` / ``.zero_point`` of an activation."""
    p = qp.points[key]
    if p.spec.granularity != "per_tensor":
        raise ValueError(f"{key}: activations are quantized per tensor, got {p.spec.short()}")
    values[f"{prefix}.scale"] = np.asarray(p.scale, np.float32).reshape(())
    values[f"{prefix}.zero_point"] = _storage(p.zero_point, p.spec).reshape(())
    names[f"{prefix}.scale"] = (key, "scale")
    names[f"{prefix}.zero_point"] = (key, "zero_point")


def _qdq_nodes(prefix: str, x: str) -> list:
    """QuantizeLinear -> DequantizeLinear of tensor ``x`` with ``<prefix>.scale/.zero_point``;
    the float result is ``<prefix>.dq``."""
    sz = [f"{prefix}.scale", f"{prefix}.zero_point"]
    return [helper.make_node("QuantizeLinear", [x, *sz], [f"{prefix}.q"], name=f"{prefix}.Q"),
            helper.make_node("DequantizeLinear", [f"{prefix}.q", *sz], [f"{prefix}.dq"],
                             name=f"{prefix}.DQ")]


def _qdq_graph(mp: onnx.ModelProto, qparams: QParams, linears: dict, u8_weights: bool,
               embedding: str = "int8", nbits_barrier: bool = True) -> dict:
    g = mp.graph
    per_token = set(per_token_linears(qparams))
    plans = {path: _plan(path, *linears[path], qparams, u8_weights, path in per_token) for path in linear_paths(mp)}
    name_map, mm_values = {}, {}
    embeds = {}
    if embedding in ("int8", "int8-own"):
        tables = {t.name: t for t in g.initializer}
        for node, path in embedding_gathers(mp):
            table = numpy_helper.to_array(tables[node.input[0]]).astype(np.float32)
            embeds[node.name] = _embedding_nodes(node, path, table, linears, qparams, plans,
                                                 share=embedding == "int8")
    elif embedding != "float":
        raise ValueError(f"embedding must be 'int8', 'int8-own' or 'float', got {embedding!r}")
    for path in matmul_paths(mp):  # attention matmuls: both operands are activations
        for i, kind in enumerate(("input", "other")):
            if f"{path}:{kind}" in qparams.points:
                _act_point(f"{path}.{kind}", f"{path}:{kind}", qparams, mm_values, name_map)
    nodes, need_lowest, rot_consts = [], False, {}
    for node in g.node:
        if node.name in embeds:
            nodes.extend(embeds[node.name][0])
            g.initializer.extend(_to_tensor(n, a) for n, a in embeds[node.name][1].items())
            continue
        path = node_tag(node)
        plan = plans.get(path)
        mm = node_tag(node, MATMUL_TAG)
        if mm is not None:
            for i, kind in enumerate(("input", "other")):
                if f"{mm}.{kind}.scale" in mm_values:
                    nodes.extend(_qdq_nodes(f"{mm}.{kind}", node.input[i]))
                    node.input[i] = f"{mm}.{kind}.dq"
        if plan is not None and node.op_type == "MatMul":
            v = plan.values
            if f"{path}.input.smooth" in v:
                nodes.append(helper.make_node("Div", [node.input[0], f"{path}.input.smooth"],
                                              [f"{path}.input.smoothed"], name=f"{path}.input.Div"))
                node.input[0] = f"{path}.input.smoothed"
            if f"{path}.input.scale" in v:
                width, block = plan.rotation
                if block:   # a rotated static input: quantize (x / m) R at the point
                    rot, x, consts = _rotation_nodes(node.input[0], f"{path}.input", width, block)
                    nodes.extend(rot)
                    rot_consts.update(consts)
                    node.input[0] = x
                nodes.extend(_qdq_nodes(f"{path}.input", node.input[0]))
                node.input[0] = f"{path}.input.dq"
                pw = qparams.points.get(f"{path}:weight")
                if nbits_barrier and pw is not None and pw.spec.bits == 4:
                    # ORT fuses DQ(4-bit weight) + MatMul into MatMulNBits only when the weight is
                    # the MatMul's one DQ input, and has no integer kernel for a uint8 activation
                    # with 4-bit weights: without this the 4-bit weights are dequantized to float
                    # on every run. Max(x, lowest float) is the identity on the dequantized
                    # activation and hides its DQ from the selector; MatMulNBits then computes in
                    # fp32 (accuracy level 1, client.runtime.ort_session), the arithmetic the
                    # QParams describe.
                    nodes.append(helper.make_node("Max", [node.input[0], BARRIER_LOWEST],
                                                  [f"{path}.input.dq.fp32"], name=f"{path}.input.Barrier"))
                    node.input[0] = f"{path}.input.dq.fp32"
                    need_lowest = True
            if f"{path}.weight.q" in v:
                nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{path}.weight.q", f"{path}.weight.scale",
                                         f"{path}.weight.zero_point"],
                    [f"{path}.weight.dq"], name=f"{path}.weight.DQ", **plan.w_attrs))
                node.input[1] = f"{path}.weight.dq"
        if plan is not None and node.op_type == "Add" and f"{path}.bias.q" in plan.values:
            nodes.append(helper.make_node(
                "DequantizeLinear", [f"{path}.bias.q", f"{path}.bias.scale"],
                [f"{path}.bias.dq"], name=f"{path}.bias.DQ", **plan.b_attrs))
            node.input[list(node.input).index(f"{path}.bias")] = f"{path}.bias.dq"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    if need_lowest:
        g.initializer.append(_to_tensor(BARRIER_LOWEST, np.array(np.finfo(np.float32).min, np.float32)))
    have = {t.name for t in g.initializer}
    g.initializer.extend(_to_tensor(n, a) for n, a in rot_consts.items() if n not in have)
    g.initializer.extend(_to_tensor(n, a) for n, a in mm_values.items())
    for plan in plans.values():
        g.initializer.extend(_to_tensor(n, a) for n, a in plan.values.items())
        name_map.update(plan.names)
    prune_unused(g)
    return name_map


def _opset(mp: onnx.ModelProto) -> int:
    return next(o.version for o in mp.opset_import if o.domain in ("", "ai.onnx"))


def _check_opset(mp: onnx.ModelProto, qparams: QParams) -> None:
    need = 13
    for key, p in qparams.points.items():
        if p.spec.bits in (4, 16) or p.spec.granularity == "per_group":
            need = 21
    if _opset(mp) < need:
        raise ValueError(f"QParams need opset {need} (int4/int16 or blocked quantization), the "
                         f"float graph has opset {_opset(mp)}: export it with opset={need}")


def names_path(model_path) -> Path:
    """Where the name map of a QDQ model lives: ``model.onnx`` -> ``model.names.json``."""
    return Path(model_path).with_suffix(".names.json")


def export_qdq(model, qparams: QParams, path, *, float_onnx=None, seq_len: int = 16,
               batch: int = 2, dynamic: bool = True, opset: int = OPSET,
               u8_weights: bool = False, embedding: str = "int8", nbits_barrier: bool = True,
               external_threshold: int = EXTERNAL_THRESHOLD) -> dict[str, tuple[str, str]]:
    """Write the QDQ model for ``model`` (a float torch model, or its Linears' float weights as
    ``{path: (weight, bias)}``: a device rebuilds its graph torch-free) and ``qparams`` to ``path``
    and its name map to ``names_path(path)``; return the name map.

    Linears without a ``:input`` / ``:weight`` key keep a float input / weight, except those
    ``qparams.meta`` names per-token (``quant.qparams.per_token_linears``), whose input is
    quantized per token at run time (``per_token_inputs``); a Linear with
    SmoothQuant factors ``m`` in ``qparams.smoothing`` gets its input divided by ``m`` (a Div
    before the QuantizeLinear) and its weight multiplied by ``m``, as QuantLinear does; a Linear
    ``qparams.meta`` names rotated (``quant.qparams.rotated_linears``) then has the smoothed input
    rotated before the QuantizeLinear and its weight stored as ``(W * m) R``. ``float_onnx``
    (a path or ModelProto from ``export_float_onnx`` of the same model) skips the slow torch
    export, so one float export serves many QParams.

    Signed 8-bit weights are stored as int8 with the QParams' zero point (0): the form ONNX
    Runtime runs fastest where its u8 x s8 kernel is exact (x86 with VNNI, Arm; design.md
    section 3). ``u8_weights`` stores those of a Linear whose input is uint8 on the uint8 grid
    instead (``q + 128``, ``z + 128``): the same real values, for x86 CPUs without VNNI, whose
    u8 x s8 kernels saturate int16 pair sums (measured: up to 27 LSB off on a tiny Llama,
    SmolLM2's next-token loss 12.9 instead of 5.5); a device normally converts at load instead
    (``set_weight_storage``, ``client.runtime.DeviceRuntime``). With it the name map holds
    ``z + 128`` for such a weight's zero-point: patch through ``qdq_values`` with the same flag.

    ``embedding="int8"`` stores the token embedding as int8 rows (``embedding_table``): a tied
    one shares the quantized lm_head, so patching lm_head's weight or smoothing moves both;
    ``"int8-own"`` gives it its own int8 rows even then (what a shared table costs in fidelity:
    ``bench/embedding_rows.py``); ``"float"`` keeps the float table. ``nbits_barrier`` puts an identity ``Max`` between a
    4-bit Linear's activation DequantizeLinear and its MatMul so that ORT runs it as MatMulNBits
    (see ``_qdq_graph``); False shows what the graph cost without it. Past
    ``external_threshold`` bytes of tensors the model is written with external data
    (``quant.onnxfile``), and ``float_onnx`` may be such a model.
    """
    qparams.validate()
    from collections.abc import Mapping

    if float_onnx is None and isinstance(model, Mapping):
        raise ValueError("export_qdq of float weights (a mapping, not a torch model) needs float_onnx")
    if float_onnx is None:
        mp = float_graph(model, seq_len=seq_len, batch=batch, dynamic=dynamic, opset=opset)
    elif isinstance(float_onnx, onnx.ModelProto):
        mp = onnx.ModelProto()
        mp.CopyFrom(float_onnx)
    else:  # the Linears' float weights come from ``model``: the graph's copies stay on disk
        mp = load_onnx(float_onnx, load_external_data=False)
        load_external(mp, Path(float_onnx).parent, only=lambda name: not name.endswith(".weight_t"))
    _check_opset(mp, qparams)
    linears = model if isinstance(model, Mapping) else float_linears(model)
    unknown = sorted(({k.rsplit(":", 1)[0] for k in qparams.points} | set(qparams.smoothing))
                     - set(linear_paths(mp)) - set(matmul_paths(mp)))
    if unknown:
        raise ValueError(f"QParams keys name no Linear of this graph: {unknown[:5]}")
    name_map = _qdq_graph(mp, qparams, linears, u8_weights, embedding, nbits_barrier)
    per_token_inputs(mp, per_token_linears(qparams), rotation_of(qparams.meta))
    if float_onnx is not None and not isinstance(float_onnx, onnx.ModelProto):
        load_external(mp, Path(float_onnx).parent)  # the weights of Linears left float, if any
    save_onnx(mp, path, external_threshold=external_threshold)
    atomic_write_bytes(names_path(path), json.dumps(
        {k: list(v) for k, v in sorted(name_map.items())}, indent=1).encode())
    return name_map


def _gathers_rows(node, w: str, z: str, consumers: dict) -> bool:
    """Whether ``node`` is a tied embedding's Gather of weight ``w`` (``_embedding_nodes``): it
    subtracts the gathered zero point ``z`` from the gathered rows, so it reads the same real
    values on either grid and does not pin the weight's storage."""
    return node.op_type == "Gather" and node.input[0] == w and \
        any(c.op_type == "Gather" and c.input[0] == z for c in consumers.get(z, []))


def u8_storable(mp: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(weight, zero point)`` initializer names of the 8-bit weights that may live on either
    grid: an int8/uint8 weight behind a DequantizeLinear that feeds only MatMuls whose activation
    comes from a DequantizeLinear with a uint8 zero point, or the weight of a per-token Linear's
    MatMulInteger (uint8 input) (what ``_plan`` moves with ``u8_weights``). Found from the graph
    alone, so it works on any QDQ model of this shape."""
    dtypes = {t.name: t.data_type for t in mp.graph.initializer}
    producer = {o: n for n in mp.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in mp.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in mp.graph.node:  # per-token Linears (per_token_inputs): the weight feeds MatMulInteger itself
        if n.op_type == "MatMulInteger" and len(n.input) == 4 and dtypes.get(n.input[2]) == TensorProto.UINT8 \
                and dtypes.get(n.input[1]) in (TensorProto.INT8, TensorProto.UINT8) \
                and dtypes.get(n.input[3]) == dtypes[n.input[1]] \
                and all((u.op_type == "MatMulInteger" and u.input[1] == n.input[1])
                        or _gathers_rows(u, n.input[1], n.input[3], consumers) for u in consumers[n.input[1]]):
            out.append((n.input[1], n.input[3]))
    for n in mp.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3:
            continue
        w, z = n.input[0], n.input[2]
        if dtypes.get(w) not in (TensorProto.INT8, TensorProto.UINT8) or dtypes.get(z) != dtypes[w]:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != n.output[0] for u in users):
            continue
        acts = [producer.get(u.input[0]) for u in users]
        if all(a is not None and a.op_type == "DequantizeLinear" and len(a.input) >= 3
               and dtypes.get(a.input[2]) == TensorProto.UINT8 for a in acts):
            out.append((w, z))
    return out


def set_weight_storage(mp: onnx.ModelProto, u8: bool) -> int:
    """Move the 8-bit weights of uint8-input MatMuls to the uint8 grid (``u8``: ``q + 128``,
    ``z + 128``) or back to int8 (``q - 128``, ``z - 128``), in place: the same real values,
    bit for bit, and the values ``qdq_values(..., u8_weights=u8)`` computes, so patching keeps
    working with that flag. Returns how many weights were moved (0: already in that form).
    Which form is exact and fast is a property of the CPU's kernel (design.md section 3,
    ``client.runtime.choose_weight_storage``)."""
    index = {t.name: i for i, t in enumerate(mp.graph.initializer)}
    src, dst = (TensorProto.INT8, np.uint8) if u8 else (TensorProto.UINT8, np.int8)
    moved = 0
    for w, z in u8_storable(mp):
        for name in (w, z):
            t = mp.graph.initializer[index[name]]
            if t.data_type != src:
                continue
            a = numpy_helper.to_array(t).astype(np.int16)
            a = a + 128 if u8 else a - 128
            t.CopyFrom(numpy_helper.from_array(a.astype(dst), name))
            moved += name == w
    return moved


def load_name_map(path) -> dict[str, tuple[str, str]]:
    """Read a name map (the JSON beside a QDQ model, or the model path itself)."""
    p = Path(path)
    if p.suffix == ".onnx":
        p = names_path(p)
    return {k: tuple(v) for k, v in json.loads(p.read_text()).items()}


def patch_initializers(mp: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Overwrite initializers by name in place, keeping each one's ONNX data type and shape."""
    index = {t.name: i for i, t in enumerate(mp.graph.initializer)}
    for name, a in values.items():
        if name not in index:
            raise KeyError(f"no initializer named {name!r}")
        old = mp.graph.initializer[index[name]]
        ref = numpy_helper.to_array(old)
        a = np.asarray(a)
        if a.shape != ref.shape:
            raise ValueError(f"{name}: shape {a.shape} != {ref.shape}")
        mp.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(a.astype(ref.dtype), name))


def with_initializers(mp: onnx.ModelProto, values: dict[str, TensorProto]) -> onnx.ModelProto:
    """A new model: ``mp`` with the initializers named in ``values`` replaced by them (their
    ONNX data type and shape checked), ``mp`` untouched. Built one tensor at a time into a fresh
    message, so a patch costs the new model, not the old one twice: replacing tensors inside
    ``mp`` keeps the replaced ones' memory until ``mp`` is freed (protobuf's arena), and a
    copy to shed it is the model once more. ``values`` is emptied as the tensors move in."""
    out = onnx.ModelProto()
    copy_fields(mp, out, skip=("graph",))
    copy_fields(mp.graph, out.graph, skip=("initializer",))
    for t in mp.graph.initializer:
        new = values.pop(t.name, None)
        if new is not None and (new.data_type != t.data_type or list(new.dims) != list(t.dims)):
            raise ValueError(f"{t.name}: {list(new.dims)} of type {new.data_type} replaces "
                             f"{list(t.dims)} of type {t.data_type}")
        out.graph.initializer.add().CopyFrom(t if new is None else new)
        del new
    if values:
        raise KeyError(f"no initializers named {sorted(values)[:5]}")
    return out


def activation_inputs(mp: onnx.ModelProto) -> dict[str, str]:
    """``{'<path>:input' (or ':other'): name of the float tensor entering its QuantizeLinear}``:
    what a client exposes as extra outputs to collect statistics."""
    out = {}
    for n in mp.graph.node:
        for kind in ("input", "other"):
            if n.op_type == "QuantizeLinear" and n.name.endswith(f".{kind}.Q"):
                out[n.name[:-len(f".{kind}.Q")] + f":{kind}"] = n.input[0]
    return out


def add_outputs(mp: onnx.ModelProto, names) -> None:
    """Expose float32 tensors as extra graph outputs (shape left open)."""
    have = {o.name for o in mp.graph.output}
    for n in names:
        if n not in have:
            mp.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
            have.add(n)


# ------------------------------------------------------------------------- ORT helpers


INTEGER_MATMULS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
                   "MatMulInteger", "QGemm")


def count_matmuls(optimized: onnx.ModelProto) -> dict[str, int]:
    """Op-type counts of the matmul-like nodes in an ORT-optimized graph."""
    counts: dict[str, int] = {}
    for n in optimized.graph.node:
        if n.op_type in INTEGER_MATMULS + ("MatMul", "Gemm", "FusedMatMul"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# --------------------------------------------------------------------------- per-token inputs

PER_TOKEN_ZERO = "fedquant.per_token.zero_point"   # uint8 128: symmetric per-token grid on uint8
PER_TOKEN_CONSTS = {PER_TOKEN_ZERO: np.array(128, np.uint8), "fedquant.per_token.qmax": np.array(127.0, np.float32),
                    "fedquant.per_token.floor": np.array(np.finfo(np.float32).tiny, np.float32),
                    "fedquant.per_token.axes": np.array([-1], np.int64),
                    "fedquant.per_token.zero_f": np.array(128.0, np.float32),
                    "fedquant.per_token.lo": np.array(0.0, np.float32),
                    "fedquant.per_token.hi": np.array(255.0, np.float32)}


def _rotation_nodes(x: str, p: str, n: int, b: int) -> tuple[list, str, dict]:
    """Nodes computing ``x R`` (``quant.rotation``: the signs ``D`` a Mul, then Reshape to blocks,
    MatMul by the Hadamard block, Reshape back) of an ``n``-wide tensor ``x`` in blocks of ``b``,
    named after ``p``; ``(nodes, output name, constants)``."""
    r = f"fedquant.rotation.{n}x{b}"
    consts = {f"{r}.signs": signs(n), f"{r}.hadamard": hadamard(b).astype(np.float32),
              f"{r}.blocks": np.array([-1, n // b, b], np.int64)}
    nodes = [helper.make_node("Shape", [x], [f"{p}.shape"], name=f"{p}.Shape"),
             helper.make_node("Mul", [x, f"{r}.signs"], [f"{p}.signed"], name=f"{p}.Signs"),
             helper.make_node("Reshape", [f"{p}.signed", f"{r}.blocks"], [f"{p}.blocks"], name=f"{p}.ToBlocks"),
             helper.make_node("MatMul", [f"{p}.blocks", f"{r}.hadamard"], [f"{p}.rotated_blocks"],
                              name=f"{p}.Hadamard"),
             helper.make_node("Reshape", [f"{p}.rotated_blocks", f"{p}.shape"], [f"{p}.rotated"],
                              name=f"{p}.FromBlocks")]
    return nodes, f"{p}.rotated", consts


def per_token_inputs(mp: onnx.ModelProto, paths, rotation: int = 0) -> list[str]:
    """Rewrite, in place, the Linears ``paths`` of a QDQ model so their input is quantized per
    token at run time instead of with the static per-tensor (s, z) of its QParams point.

    Why: static 8-bit ranges calibrated on the fleet's text clip the massive activations other
    text brings to the ``down_proj`` inputs of small LLMs (``bench/ood_gap.py``: those 30 points
    carry the int8 profile's out-of-domain error). A per-token scale ``s_t = max_k |x_tk| / 127``
    follows each token (ZeroQuant, Yao et al., NeurIPS 2022; LLM.int8(), Dettmers et al., 2022;
    what XNNPACK's qd8 kernels do on phones). The arithmetic stays integer: the input goes to the
    uint8 grid ``q = round(x / s_t) + 128`` (ONNX round, half to even) and ONNX Runtime's
    MatMulInteger sums ``(q - 128)(w_q - z_w)`` exactly in int32 with the weight as the runtime
    stores it (int8, or uint8 where u8 x s8 saturates: ``set_weight_storage``); the int32 sum
    times ``s_t`` times the weight scale is the output. A SmoothQuant Div before the point stays.

    Each path must have the exported shape (``_qdq_graph``): a float input, or a static input
    Q -> DQ, into a MatMul <- weight DQ of an 8-bit weight per tensor or per output channel.
    ``export_qdq`` calls this on the Linears QParams name per-token (they have no input point);
    ``bench/per_token.py`` also rewrites static ones of a finished run's model. Returns the paths
    rewritten. Raises ValueError naming the Linear, before changing anything, otherwise.

    ``rotation`` (a block, ``quant.rotation``): the input (after the Div) is rotated first,
    ``x R`` = Reshape to blocks, MatMul by the Hadamard block, Reshape back, with the signs ``D``
    a Mul before; the weight must then already be ``W R`` (``export_qdq``'s ``_plan`` stores it so).
    0: the input as it is."""
    g = mp.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    matmuls = {node_tag(n): n for n in g.node if n.op_type == "MatMul" and node_tag(n) is not None}
    drop, new_at, done, rot_consts = set(), {}, [], {}
    for path in paths:
        mm = matmuls.get(path)
        dq = producer.get(mm.input[0]) if mm is not None else None
        if dq is not None and dq.op_type != "DequantizeLinear":
            dq = None                                   # a float input (the export's form)
        q = producer.get(dq.input[0]) if dq is not None else None
        wdq = producer.get(mm.input[1]) if mm is not None else None
        if mm is None or (dq is not None and (q is None or q.op_type != "QuantizeLinear")) \
                or wdq is None or wdq.op_type != "DequantizeLinear":
            raise ValueError(f"{path}: not a QDQ Linear ([input Q -> DQ ->] MatMul <- weight DQ)")
        wq, ws, wz = wdq.input[0], wdq.input[1], wdq.input[2] if len(wdq.input) > 2 else ""
        w = inits.get(wq)
        if w is None or w.data_type not in (TensorProto.INT8, TensorProto.UINT8) or not wz:
            raise ValueError(f"{path}: per-token inputs need an 8-bit weight with a zero point, got "
                             f"{onnx.TensorProto.DataType.Name(w.data_type) if w is not None else 'no initializer'}")
        s_shape = tuple(inits[ws].dims)
        if len(s_shape) > 1 or (len(s_shape) == 1 and next((a.i for a in wdq.attribute if a.name == "axis"), 1) != 1):
            raise ValueError(f"{path}: per-token inputs need weights per tensor or per output channel, "
                             f"got a scale of shape {s_shape}")
        if dq is not None and (len(consumers.get(dq.output[0], [])) != 1 or len(consumers.get(q.output[0], [])) != 1):
            raise ValueError(f"{path}: its quantized input feeds more than its MatMul")
        if any(c is not wdq and not _gathers_rows(c, wq, wz, consumers) for c in consumers.get(wq, [])):
            # the runtime could not move a weight another node computes with to the uint8 grid that
            # keeps MatMulInteger exact on x86 without VNNI (u8_storable); a tied embedding may read it
            raise ValueError(f"{path}: its integer weight is read by more than its MatMul and a tied "
                             "embedding; per-token inputs need a Linear whose weight only it reads")
        x, p = (q.input[0] if dq is not None else mm.input[0]), f"{path}.input.per_token"
        c = lambda k: f"fedquant.per_token.{k}"
        rot_nodes = []
        b = block_for(int(w.dims[0]), rotation) if rotation else 0
        if b:
            rot_nodes, x, consts = _rotation_nodes(x, p, int(w.dims[0]), b)
            rot_consts.update(consts)
        mmi = helper.make_node("MatMulInteger", [f"{p}.q", wq, PER_TOKEN_ZERO, wz], [f"{p}.acc"],
                               name=f"{path}/MatMulInteger")
        mmi.metadata_props.add(key=LINEAR_TAG, value=path)   # still the Linear's product
        new_at[id(mm)] = rot_nodes + [
            helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}.Abs"),
            helper.make_node("ReduceMax", [f"{p}.abs", c("axes")], [f"{p}.absmax"], name=f"{p}.ReduceMax", keepdims=1),
            helper.make_node("Div", [f"{p}.absmax", c("qmax")], [f"{p}.scale0"], name=f"{p}.ScaleDiv"),
            helper.make_node("Max", [f"{p}.scale0", c("floor")], [f"{p}.scale"], name=f"{p}.ScaleFloor"),
            helper.make_node("Div", [x, f"{p}.scale"], [f"{p}.x_s"], name=f"{p}.Div"),
            helper.make_node("Round", [f"{p}.x_s"], [f"{p}.rounded"], name=f"{p}.Round"),
            helper.make_node("Add", [f"{p}.rounded", c("zero_f")], [f"{p}.shifted"], name=f"{p}.Shift"),
            helper.make_node("Clip", [f"{p}.shifted", c("lo"), c("hi")], [f"{p}.clipped"], name=f"{p}.Clip"),
            helper.make_node("Cast", [f"{p}.clipped"], [f"{p}.q"], name=f"{p}.Cast", to=TensorProto.UINT8),
            mmi,
            helper.make_node("Cast", [f"{p}.acc"], [f"{p}.acc_f"], name=f"{p}.AccCast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}.acc_f", f"{p}.scale"], [f"{p}.y_x"], name=f"{p}.MulTokenScale"),
            helper.make_node("Mul", [f"{p}.y_x", ws], [mm.output[0]], name=f"{p}.MulWeightScale")]
        drop |= {id(mm)} | ({id(q), id(dq)} if dq is not None else set())
        if len(consumers.get(wdq.output[0], [])) == 1:
            drop.add(id(wdq))
        done.append(path)
    if not done:
        return done
    nodes = []
    for n in g.node:
        nodes.extend(new_at.get(id(n), []))
        if id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    have = {t.name for t in g.initializer}
    g.initializer.extend(_to_tensor(n, a) for n, a in {**PER_TOKEN_CONSTS, **rot_consts}.items() if n not in have)
    prune_unused(g)
    return done

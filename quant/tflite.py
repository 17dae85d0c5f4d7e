"""The LiteRT (TensorFlow Lite) form of the model a phone runs (design.md section 5, "A second
runtime"): the same quantization points, scales and zero points as the ONNX QDQ model of
``quant.qdq``, as fields of a ``.tflite`` flatbuffer.

Made in two steps, one function each:

- ``convert_float``: the torch model, with what the QParams fix outside the points folded in
  (SmoothQuant: ``x / m`` before each Linear and ``W * m`` as its weight; the int8 token
  embedding's values; the int32 bias's values), converted by ``litert_torch`` to a float
  ``.tflite`` with a fixed input shape;
- ``quantize_points``: flatbuffer surgery on that float model. Each Linear's FULLY_CONNECTED
  (found by its float weight's bytes, which the converter stores as it got them) gets
  QUANTIZE -> DEQUANTIZE on its input with the point's scale and zero point, and an int8
  per-channel weight behind a DEQUANTIZE, so the graph computes ``(q_x - z_x) s_x (q_w s_w)``,
  what ONNX Runtime's integer kernel computes, in the interpreter's float arithmetic.
  ``integer=True`` instead feeds the int8 input and the int8 weight to the FULLY_CONNECTED
  itself (TFLite's integer kernel), which then needs an int8 output with a scale of its own:
  a point the fleet's QParams do not have (``output_ranges`` gives its range).

The tensors of a point are named ``<qparams key>`` (``model.layers.0.mlp.up_proj:input``), so a
device can patch a release's QParams into these fields by name without converting again
(``patch_points``).

The activation points of the ``int8`` profile are uint8 (ONNX Runtime's x86 preference):
``integer=True`` stores them as int8 ``q - 128`` with ``z - 128``, the same real values, because
TFLite's integer FULLY_CONNECTED takes int8. The QDQ form keeps the fleet's dtype.

torch and litert_torch only in ``convert_float``; the surgery and the patching need numpy and
the flatbuffer schema of ``ai_edge_litert`` (the ``fedquant[litert]`` extra), not the interpreter.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np

from quant.affine import quantize
from quant.qdq import bias_quant, embedding_table
from quant.qparams import QParams, atomic_write_bytes, per_token_linears, rotated_linears

EXTRA_HINT = "the LiteRT packages are missing: pip install -e '.[litert]' (see README, LiteRT)"
LITERT_MODULES = ("ai_edge_litert", "litert_torch")     # the interpreter (+ schema), the converter


def missing_litert(modules=LITERT_MODULES) -> list[str]:
    """The modules of ``modules`` this Python cannot import (not imported here: only looked up),
    so a config or a node can refuse a LiteRT job before any work, with ``EXTRA_HINT``."""
    import importlib.util

    out = []
    for m in modules:
        try:
            spec = importlib.util.find_spec(m)
        except (ImportError, ValueError):
            spec = None
        if spec is None or (spec.loader is None and not spec.submodule_search_locations):
            out.append(m)
    return out


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(EXTRA_HINT) from e
    return schema, flatbuffer_utils


# ------------------------------------------------------------------------- float model


def device_module(model, qparams: QParams):
    """A copy of ``model`` that computes in float what the QDQ graph computes outside its points:
    each smoothed Linear divides its input by ``m`` and holds ``W * m`` (as ``quant.qdq``); a
    Linear with an int32 bias holds that bias's real values; the token embedding holds the int8
    table's real values (``embedding_table``; a tied lm_head is untied, since its weight is now
    ``W * m`` and quantized separately)."""
    import torch

    from quant.export import float_linears

    linears = float_linears(model)
    dev = copy.deepcopy(model).eval()

    class SmoothedInput(torch.nn.Module):
        """``linear(x / m)``: the Div that ``quant.qdq`` puts before the input's QuantizeLinear."""

        def __init__(self, linear, m):
            super().__init__()
            self.linear = linear
            self.register_buffer("m", torch.from_numpy(np.asarray(m, np.float32)))

        def forward(self, x):
            return self.linear(x / self.m)

    emb = dev.get_input_embeddings()
    table = emb.weight.detach().float().numpy()
    emb.weight = torch.nn.Parameter(torch.from_numpy(embedding_table(table, linears, qparams).copy()),
                                    requires_grad=False)
    if hasattr(dev.config, "tie_word_embeddings"):
        dev.config.tie_word_embeddings = False
    for path, (w, b) in linears.items():
        lin = dev.get_submodule(path)
        m = qparams.smoothing.get(path)
        if m is not None:
            w = w * np.asarray(m, np.float32)
        lin.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, np.float32)),
                                        requires_grad=False)
        pi, pw = qparams.points.get(f"{path}:input"), qparams.points.get(f"{path}:weight")
        if b is not None and pi is not None and pw is not None and _per_out(pw.spec):
            bq, bs = bias_quant(b, pi.scale, pw.scale)
            lin.bias = torch.nn.Parameter(torch.from_numpy((bq.astype(np.float32) * bs).astype(np.float32)),
                                          requires_grad=False)
        if m is not None:
            parent, _, leaf = path.rpartition(".")
            owner = dev.get_submodule(parent) if parent else dev
            setattr(owner, leaf, SmoothedInput(lin, m))
    return dev


def _per_out(spec) -> bool:
    return spec.granularity == "per_tensor" or (
        spec.granularity == "per_channel" and spec.resolved_axis(2) == 0)


def convert_float(model, qparams: QParams | None, path, *, batch: int = 1, seq_len: int = 64) -> dict:
    """Write the float ``.tflite`` of ``device_module(model, qparams)`` (input token ids int32
    ``[batch, seq_len]``, output logits) to ``path``; return ``{linear path: float32 weight as
    stored}`` for ``quantize_points`` to find each Linear by. ``qparams=None``: the model as it
    is (the float reference, and what LiteRT's own quantizer starts from)."""
    import torch

    try:
        import litert_torch
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(EXTRA_HINT) from e
    from quant.export import _logits_only

    dev = model.eval() if qparams is None else device_module(model, qparams)
    ids = torch.zeros((batch, seq_len), dtype=torch.int32)
    edge = litert_torch.convert(_logits_only(dev).eval(), (ids,))
    edge.export(str(path))
    return stored_weights(model, qparams)


def stored_weights(model, qparams: QParams | None) -> dict[str, np.ndarray]:
    """``{linear path: W * m}`` (float32; ``W`` without smoothing): each Linear's weight as
    ``convert_float`` stores it, what ``quantize_points`` finds it by and quantizes."""
    from quant.export import float_linears

    smoothing = {} if qparams is None else qparams.smoothing
    return {p: (w * np.asarray(smoothing[p], np.float32) if p in smoothing else w).astype(np.float32)
            for p, (w, _) in float_linears(model).items()}


# ------------------------------------------------------------------------ flatbuffer surgery


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _opcode(model, schema, code: int, version: int = 1) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _new_buffer(model, schema, data: np.ndarray | None) -> int:
    buf = schema.BufferT()
    if data is not None:
        buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    model.buffers.append(buf)
    return len(model.buffers) - 1


def _new_tensor(model, graph, schema, name: str, shape, ttype: int, data=None, scale=None,
                zero_point=None, axis: int = 0) -> int:
    t = schema.TensorT()
    t.name, t.shape, t.type = name, list(int(d) for d in shape), ttype
    t.buffer = _new_buffer(model, schema, data) if data is not None else 0
    if scale is not None:
        q = schema.QuantizationParametersT()
        q.scale = [float(s) for s in np.atleast_1d(np.asarray(scale, np.float32))]
        q.zeroPoint = [int(z) for z in np.atleast_1d(np.asarray(zero_point, np.int64))]
        q.quantizedDimension = axis
        t.quantization = q
    graph.tensors.append(t)
    return len(graph.tensors) - 1


def _op(model, graph, schema, code: int, inputs, outputs, version: int = 1):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, schema, code, version)
    op.inputs, op.outputs = list(inputs), list(outputs)
    return op


def _tensor_type(schema, dtype) -> int:
    return {np.dtype(np.int8): schema.TensorType.INT8, np.dtype(np.uint8): schema.TensorType.UINT8,
            np.dtype(np.int16): schema.TensorType.INT16}[np.dtype(dtype)]


def _activation_storage(p, integer: bool) -> tuple[np.dtype, int]:
    """dtype and zero point a point's tensor holds: the fleet's, or int8 for TFLite's integer
    kernels (a uint8 point moves by -128: the same real values)."""
    z = int(np.asarray(p.zero_point).reshape(()))
    dtype = p.spec.numpy_dtype
    if integer and p.spec.bits == 8 and not p.spec.signed:
        return np.dtype(np.int8), z - 128
    return np.dtype(dtype), z


def _linear_fcs(model, graph, schema, weights: dict[str, np.ndarray], where) -> dict[int, str]:
    """``{operator index: Linear path}``: each Linear's FULLY_CONNECTED, found by its float weight's
    bytes (``weights``: what ``convert_float`` stored); ValueError unless each is found once."""
    fc_code = schema.BuiltinOperator.FULLY_CONNECTED
    by_digest: dict[str, list[int]] = {}
    for i, op in enumerate(graph.operators):
        oc = model.operatorCodes[op.opcodeIndex]
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) != fc_code:
            continue
        t = graph.tensors[op.inputs[1]]
        data = model.buffers[t.buffer].data
        if data is None or t.type != schema.TensorType.FLOAT32:
            continue
        by_digest.setdefault(_digest(np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.float32)),
                             []).append(i)
    fc_of = {}
    for path, w in weights.items():
        hits = by_digest.get(_digest(np.asarray(w, np.float32)), [])
        if len(hits) != 1:
            raise ValueError(f"{where}: Linear {path} matches {len(hits)} FULLY_CONNECTED weights "
                             "(expected exactly one: was the model converted by convert_float with these QParams?)")
        fc_of[hits[0]] = path
    return fc_of


def expose_inputs(tflite_bytes: bytes, weights: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The float ``.tflite`` with each Linear's float input as a graph output and nothing else
    (ops that feed no such input are dropped, lm_head's logits included): what a LiteRT device
    collects statistics with, as ``client.runtime.FloatCapture`` does on the float ONNX graph.
    Returns the bytes and ``{'<path>:input': output tensor name}`` (Linears that share an input,
    q/k/v, share one output)."""
    schema, fu = _schema()
    model = fu.read_model_from_bytearray(bytearray(tflite_bytes))
    graph = model.subgraphs[0]
    fc_of = _linear_fcs(model, graph, schema, weights, "float model")
    tensors, outputs = {}, []
    for i in sorted(fc_of):
        x = graph.operators[i].inputs[0]
        if x not in outputs:
            outputs.append(x)
            graph.tensors[x].name = f"{fc_of[i]}:input"
        tensors[f"{fc_of[i]}:input"] = _name(graph.tensors[x])
    needed, kept = set(outputs), []
    for op in reversed(graph.operators):     # operators are in execution order
        if any(o in needed for o in op.outputs):
            kept.append(op)
            needed.update(i for i in op.inputs if i >= 0)
    graph.operators = kept[::-1]
    graph.outputs = outputs
    for sig in model.signatureDefs or []:
        out = []
        for x in outputs:
            m = schema.TensorMapT()
            m.name, m.tensorIndex = _name(graph.tensors[x]), x
            out.append(m)
        sig.outputs = out
    return bytes(fu.convert_object_to_bytearray(model)), tensors


def quantize_points(float_path, weights: dict[str, np.ndarray], qparams: QParams, out_path, *,
                    integer: bool = False, output_ranges: dict[str, tuple[float, float]] | None = None,
                    embedding: str = "int8") -> dict[str, list[str]]:
    """Write to ``out_path`` the model of ``float_path`` (from ``convert_float``) with the points of
    ``qparams`` at each Linear's FULLY_CONNECTED; ``weights`` is ``convert_float``'s return value.
    Returns ``{qparams key: [tensor names]}`` of the tensors that carry each point.

    Linears whose input point is missing keep a float input, those whose weight point is missing a
    float weight. ``integer``: the FULLY_CONNECTED runs TFLite's int8 kernel (int8 input, int8
    per-channel weight, int32 bias with scale ``s_x * s_w``) with an int8 output dequantized
    right after; ``output_ranges[path]`` is that output's (min, max), a point the fleet does not
    calibrate (required for every such Linear). ``embedding="int8"``: the token embedding table
    becomes int8 rows (``_int8_embedding``), as in the ONNX model; ``"float"`` keeps its values
    in float32."""
    per_token = per_token_linears(qparams)
    if per_token:   # a float input here would pass for the device's int8 one without a word
        raise ValueError(f"QParams quantize the inputs of {len(per_token)} Linears per token at run time "
                         f"({per_token[0]}, ...): the LiteRT export has static per-tensor activations only")
    if qparams.codes:   # the .tflite would round the weights to the nearest, not GPTQ's codes
        raise ValueError(f"QParams carry the codes of {len(qparams.codes)} weights ({sorted(qparams.codes)[0]}, ...): "
                         "the LiteRT export rounds its weights to the nearest")
    rotated = rotated_linears(qparams)
    if rotated:     # the .tflite would quantize x, not x R, with ranges and weights of x R
        raise ValueError(f"QParams rotate the inputs of {len(rotated)} Linears ({rotated[0]}, ...): the LiteRT "
                         "export has no rotation (quant.rotation); export those QParams to ONNX")
    schema, fu = _schema()
    model = fu.read_model(str(float_path))
    if len(model.subgraphs) != 1:
        raise ValueError(f"{float_path}: expected one subgraph, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    fc_of = _linear_fcs(model, graph, schema, weights, float_path)
    unknown = sorted({k.rsplit(":", 1)[0] for k in qparams.points} - set(weights))
    if unknown:
        raise ValueError(f"QParams keys name no Linear of this model: {unknown[:5]}")
    T = schema.TensorType
    Q, DQ = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE
    carried: dict[str, list[str]] = {}
    new_ops, dropped_buffers = [], set()
    for i, op in enumerate(graph.operators):
        path = fc_of.get(i)
        if path is None:
            new_ops.append(op)
            continue
        pi, pw = qparams.points.get(f"{path}:input"), qparams.points.get(f"{path}:weight")
        x = op.inputs[0]
        xshape = graph.tensors[x].shape
        if pi is not None:
            if pi.spec.granularity != "per_tensor":
                raise ValueError(f"{path}:input: activations are quantized per tensor, got {pi.spec.short()}")
            dtype, z = _activation_storage(pi, integer)
            xq = _new_tensor(model, graph, schema, f"{path}:input", xshape, _tensor_type(schema, dtype),
                             scale=pi.scale, zero_point=z)
            new_ops.append(_op(model, graph, schema, Q, [x], [xq], version=2))
            carried[f"{path}:input"] = [f"{path}:input"]
            if not integer:
                xdq = _new_tensor(model, graph, schema, f"{path}:input.dq", xshape, T.FLOAT32)
                new_ops.append(_op(model, graph, schema, DQ, [xq], [xdq], version=2))
                op.inputs[0] = xdq
            else:
                op.inputs[0] = xq
        if pw is not None:
            w = weights[path]
            if pw.spec.bits != 8 or pw.spec.granularity not in ("per_channel", "per_tensor") or \
                    not _per_out(pw.spec) or not pw.spec.signed:
                raise ValueError(f"{path}:weight: LiteRT export takes int8 weights per output channel "
                                 f"or per tensor, got {pw.spec.short()}")
            q = quantize(w, pw.scale, pw.zero_point, pw.spec).astype(np.int8)
            s = np.broadcast_to(np.asarray(pw.scale, np.float32).reshape(-1), (w.shape[0],)) \
                if pw.spec.granularity == "per_channel" else np.asarray(pw.scale, np.float32).reshape(-1)
            zw = np.zeros(s.shape, np.int64) + np.asarray(pw.zero_point, np.int64).reshape(-1)
            old = graph.tensors[op.inputs[1]]
            dropped_buffers.add(old.buffer)
            wq = _new_tensor(model, graph, schema, f"{path}:weight", w.shape, T.INT8, data=q,
                             scale=s, zero_point=zw, axis=0)
            carried[f"{path}:weight"] = [f"{path}:weight"]
            if not integer:
                wdq = _new_tensor(model, graph, schema, f"{path}:weight.dq", w.shape, T.FLOAT32)
                new_ops.append(_op(model, graph, schema, DQ, [wq], [wdq], version=2))
                op.inputs[1] = wdq
            else:
                op.inputs[1] = wq
        if integer:
            _integer_fc(model, graph, schema, op, path, pi, pw, output_ranges, new_ops, carried,
                        dropped_buffers)
        else:
            new_ops.append(op)
    graph.operators = new_ops
    if embedding == "int8":
        _int8_embedding(model, graph, schema, qparams, carried, dropped_buffers)
    elif embedding != "float":
        raise ValueError(f"embedding must be 'int8' or 'float', got {embedding!r}")
    _drop_dead_buffers(model, dropped_buffers)
    atomic_write_bytes(out_path, bytes(fu.convert_object_to_bytearray(model)))
    return carried


def _int8_embedding(model, graph, schema, qparams: QParams, carried: dict, dropped_buffers: set) -> None:
    """The token embedding as int8 rows, as ``quant.qdq`` stores it: a tied lm_head's table
    (``device_module`` put ``dequantize(q_head) / m`` in it) becomes an int8 view of lm_head's own
    weight buffer with its per-row scales (one copy in the file, patched with lm_head), then a
    DIV by lm_head's smoothing factors; an untied table gets its own per-row min-max int8 rows.
    EMBEDDING_LOOKUP's hybrid kernel (int8 table, float output) scales each row."""
    from quant.qdq import own_embedding_rows

    code = schema.BuiltinOperator.EMBEDDING_LOOKUP
    T = schema.TensorType
    lookups = [op for op in graph.operators
               if max(model.operatorCodes[op.opcodeIndex].builtinCode,
                      model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == code]
    by_name = {_name(t): i for i, t in enumerate(graph.tensors)}
    for op in lookups:
        tt = graph.tensors[op.inputs[1]]
        if tt.type != T.FLOAT32 or model.buffers[tt.buffer].data is None:
            continue
        table = np.frombuffer(np.asarray(model.buffers[tt.buffer].data, np.uint8).tobytes(),
                              np.float32).reshape(tt.shape)
        head = None
        for path in (k.rsplit(":", 1)[0] for k in carried if k.endswith(":weight")):
            wt = graph.tensors[by_name[f"{path}:weight"]]
            p = qparams.points[f"{path}:weight"]
            if list(wt.shape) != list(table.shape) or p.spec.granularity != "per_channel":
                continue
            q = np.frombuffer(np.asarray(model.buffers[wt.buffer].data, np.uint8).tobytes(), np.int8)
            s = np.asarray(wt.quantization.scale, np.float32)
            rows = q.reshape(table.shape).astype(np.float32) * s[:, None]
            m = qparams.smoothing.get(path)
            if m is not None:
                rows = rows / np.asarray(m, np.float32)
            if np.array_equal(rows, table):
                head = path
                break
        dropped_buffers.add(tt.buffer)
        if head is None:
            q, s = own_embedding_rows(table)
            op.inputs[1] = _new_tensor(model, graph, schema, "embedding.weight", table.shape, T.INT8, data=q,
                                       scale=s.reshape(-1),
                                       zero_point=np.zeros(table.shape[0], np.int64), axis=0)
            continue
        wt = graph.tensors[by_name[f"{head}:weight"]]
        shared = _new_tensor(model, graph, schema, f"{head}:weight.embedding", table.shape, T.INT8,
                             scale=wt.quantization.scale, zero_point=wt.quantization.zeroPoint, axis=0)
        graph.tensors[shared].buffer = wt.buffer
        carried[f"{head}:weight"].append(f"{head}:weight.embedding")
        op.inputs[1] = shared
        m = qparams.smoothing.get(head)
        if m is not None:
            out = op.outputs[0]
            rows = _new_tensor(model, graph, schema, f"{head}:weight.embedding.rows", graph.tensors[out].shape,
                               T.FLOAT32)
            op.outputs[0] = rows
            mt = _new_tensor(model, graph, schema, f"{head}.smooth", [len(m)], T.FLOAT32,
                             data=np.asarray(m, np.float32))
            div = _op(model, graph, schema, schema.BuiltinOperator.DIV, [rows, mt], [out])
            graph.operators.insert(graph.operators.index(op) + 1, div)


def _drop_dead_buffers(model, candidates) -> None:
    """Empty the buffers of ``candidates`` (the replaced float weights) that no operator, graph
    input or output reads any more: their tensors stay in the table, their bytes leave the file."""
    live = set()
    for g in model.subgraphs:
        used = {i for op in g.operators for i in list(op.inputs) + list(op.outputs) if i >= 0}
        used |= set(g.inputs) | set(g.outputs)
        live |= {g.tensors[i].buffer for i in used}
    for b in set(candidates) - live:
        model.buffers[b].data = None


def _integer_fc(model, graph, schema, op, path, pi, pw, output_ranges, new_ops, carried,
                dropped_buffers) -> None:
    """Make ``op`` TFLite's int8 FULLY_CONNECTED: int32 bias with scale ``s_x * s_w``, int8 output
    with the range ``output_ranges[path]`` (min-max to an asymmetric int8 scale), dequantized to
    float for the ops after it."""
    from quant.affine import range_to_qparams
    from quant.spec import QuantSpec

    if pi is None or pw is None:
        raise ValueError(f"{path}: the integer FULLY_CONNECTED needs both the input and the weight point")
    if not output_ranges or path not in output_ranges:
        raise ValueError(f"{path}: integer=True needs output_ranges[{path!r}]: TFLite's int8 "
                         "FULLY_CONNECTED writes int8 with a scale of its own")
    T = schema.TensorType
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bt = graph.tensors[op.inputs[2]]
        b = np.frombuffer(np.asarray(model.buffers[bt.buffer].data, np.uint8).tobytes(), np.float32)
        dropped_buffers.add(bt.buffer)
        bq, bs = bias_quant(b, pi.scale, pw.scale)
        bs = np.broadcast_to(np.asarray(bs, np.float32).reshape(-1), b.shape)
        op.inputs[2] = _new_tensor(model, graph, schema, f"{path}:bias", b.shape, T.INT32, data=bq,
                                   scale=bs, zero_point=np.zeros(b.shape, np.int64), axis=0)
        carried.setdefault(f"{path}:weight", []).append(f"{path}:bias")
    y = op.outputs[0]
    yshape = graph.tensors[y].shape
    spec = QuantSpec(bits=8, signed=True, symmetric=False, granularity="per_tensor")
    s, z = range_to_qparams(*output_ranges[path], spec)
    yq = _new_tensor(model, graph, schema, f"{path}:output", yshape, T.INT8, scale=s, zero_point=z)
    op.outputs[0] = yq
    new_ops.append(op)
    new_ops.append(_op(model, graph, schema, schema.BuiltinOperator.DEQUANTIZE, [yq], [y], version=2))


# ------------------------------------------------------------------------------ patching


def patch_points(tflite_bytes: bytes, qparams: QParams, weights: dict[str, np.ndarray],
                 biases: dict[str, np.ndarray] | None = None) -> bytes:
    """The same ``.tflite`` with the scales and zero points of ``qparams`` written into the
    quantization fields of the tensors named by its keys, without converting again: a weight is
    re-quantized from the device's float ``weights`` (``stored_weights``: ``W * m``), and the
    bias of a Linear whose ``s_x`` or ``s_w`` moved is re-derived from its float ``biases[path]``
    (a stale bias drifts, design.md section 3): the float values of the int32 bias in the QDQ
    form, the int32 tensor and its scale ``s_x * s_w`` in the integer form. Only what a release
    may change without a new graph: a point's dtype and shape stay; new smoothing factors are
    constants of the float graph (convert again) and are refused."""
    schema, fu = _schema()
    model = fu.read_model_from_bytearray(bytearray(tflite_bytes))
    graph = model.subgraphs[0]
    index = {_name(t): i for i, t in enumerate(graph.tensors)}
    if qparams.smoothing:
        raise ValueError("patch_points: smoothing factors are constants of the converted graph; "
                         "convert again for new factors (quant.tflite.convert_float)")
    touched = set()
    for key, p in qparams.points.items():
        if key not in index:
            raise KeyError(f"no tensor named {key!r} in this .tflite")
        t = graph.tensors[index[key]]
        path = key.rsplit(":", 1)[0]
        touched.add(path)
        if key.endswith(":weight"):
            if path not in weights:
                raise KeyError(f"{key}: no float weight of {path} to re-quantize from")
            q = quantize(weights[path], p.scale, p.zero_point, p.spec).astype(np.int8)
            if q.size != len(model.buffers[t.buffer].data):
                raise ValueError(f"{key}: {q.size} weights for a tensor of {len(model.buffers[t.buffer].data)}")
            model.buffers[t.buffer].data = np.frombuffer(q.tobytes(), np.uint8)
            n = len(t.quantization.scale)
            t.quantization.scale = [float(v) for v in np.broadcast_to(np.asarray(p.scale, np.float32).reshape(-1), (n,))]
            for other in graph.tensors:     # a tied embedding reads the same int8 rows
                if other is not t and other.buffer == t.buffer and other.quantization is not None:
                    other.quantization.scale = list(t.quantization.scale)
        else:
            z = int(np.asarray(p.zero_point).reshape(()))
            if t.type == schema.TensorType.INT8 and not p.spec.signed:
                z -= 128
            t.quantization.scale = [float(np.asarray(p.scale, np.float32).reshape(()))]
            t.quantization.zeroPoint = [z]
    _patch_biases(model, graph, schema, index, touched, biases or {})
    return bytes(fu.convert_object_to_bytearray(model))


def _name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else t.name


def _patch_biases(model, graph, schema, index, paths, biases) -> None:
    """Re-derive the bias of every FULLY_CONNECTED of ``paths`` that has both points and a bias,
    from the scales now in the file."""
    for op in graph.operators:
        if len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        wname = _name(graph.tensors[op.inputs[1]])
        path = wname.split(":", 1)[0]
        if path not in paths or f"{path}:input" not in index or f"{path}:weight" not in index:
            continue
        if path not in biases:
            raise KeyError(f"{path}: its scales changed and it has a bias: give its float bias "
                           "(a stale bias drifts, design.md section 3)")
        s_x = graph.tensors[index[f"{path}:input"]].quantization.scale[0]
        s_w = np.asarray(graph.tensors[index[f"{path}:weight"]].quantization.scale, np.float32)
        bq, bs = bias_quant(np.asarray(biases[path], np.float32), s_x, s_w)
        bs = np.broadcast_to(np.asarray(bs, np.float32).reshape(-1), bq.shape)
        bt = graph.tensors[op.inputs[2]]
        if bt.type == schema.TensorType.INT32:          # the integer form
            model.buffers[bt.buffer].data = np.frombuffer(bq.tobytes(), np.uint8)
            bt.quantization.scale = [float(v) for v in bs]
        else:                                           # the QDQ form: the int32 bias's values
            model.buffers[bt.buffer].data = np.frombuffer((bq.astype(np.float32) * bs).astype(np.float32).tobytes(), np.uint8)

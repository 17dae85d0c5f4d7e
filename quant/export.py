"""Export a Hugging Face causal LM to the float ONNX graph that its QDQ model is built from.

What a phone runs is made in three steps (design.md sections 5 and 8), one module each:

- here, ``export_float_onnx``: the float graph ``input_ids -> logits`` (no KV cache, no mask input),
  with every ``nn.Linear`` found by the exporter's ``pkg.torch.onnx.name_scopes`` metadata and its
  weight stored as a real initializer named ``<module path>.weight_t`` (ONNX layout, in x out).
  The exporter's own names (``val_113``) mean nothing, it deduplicates equal initializers across
  modules and writes a tied ``lm_head`` as a Transpose of the embedding; we take every weight
  from the torch module instead. Each Linear's MatMul (and bias Add) and each eager attention
  matmul carries a metadata tag naming its module path (``node_tag``), which the later steps find
  their points by;
- ``quant.qdq.export_qdq``: the same graph with QuantizeLinear/DequantizeLinear and its QParams;
- ``quant.encodings.write_encodings_json``: the same parameters as AIMET/QNN encodings.

torch is imported inside the functions that trace a model, not at module load: the graph helpers
(``node_tag``, ``prune_unused``, ``linear_paths``) serve a phone that has onnx and numpy only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quant.onnxfile import EXTERNAL_THRESHOLD, load_external, load_onnx, save_onnx

OPSET = 21  # int16/int4 QuantizeLinear and blocked DequantizeLinear need opset 21
LINEAR_TAG = "fedquant.linear"  # metadata_props key we put on each Linear's MatMul and bias Add
MATMUL_TAG = "fedquant.matmul"  # ... and on each attention matmul (<attention path>.qk_matmul)
_SCOPES = "pkg.torch.onnx.name_scopes"
_WRAP = "lm"  # attribute holding the model inside the export wrapper; stripped from module paths


def _logits_only(model):
    """``input_ids -> logits`` without cache, so the graph has one input and one output.
    torch is imported here, not at module load: patching on a phone needs only onnx + numpy."""
    import torch

    class _LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.lm = model

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return _LogitsOnly(model)


def float_linears(model) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{module path: (weight (out, in), bias or None)}`` of every nn.Linear, as float32 numpy."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().float().cpu().numpy()
            b = None if mod.bias is None else mod.bias.detach().float().cpu().numpy()
            out[name] = (w, b)
    return out


# ------------------------------------------------------------------------------- float export


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == _SCOPES:
            return ast.literal_eval(p.value)
    return []


def node_tag(node, key: str = LINEAR_TAG) -> str | None:
    """The module path a node of a graph from this module is tagged with (``LINEAR_TAG``: a
    Linear's MatMul or bias Add; ``MATMUL_TAG``: an attention matmul), or None."""
    for p in node.metadata_props:
        if p.key == key:
            return p.value
    return None


def _set_tag(node, path: str, key: str = LINEAR_TAG) -> None:
    node.metadata_props.add(key=key, value=path)


def prune_unused(graph) -> None:
    """Drop nodes, initializers and value_info that no graph output depends on (after surgery,
    and when a client keeps only the tensors it captures)."""
    needed = {o.name for o in graph.output}
    dropped = []
    for k in range(len(graph.node) - 1, -1, -1):
        node = graph.node[k]
        if any(o in needed for o in node.output):
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # names used inside subgraphs (If/Loop), if any
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for n in sub.node for i in n.input)
        else:
            dropped.append(k)
    # deleted in place, never copied back: protobuf copies what a repeated field is extended with,
    # and the weights of a large model would be held twice
    for k in dropped:  # descending indices
        del graph.node[k]
    for field in (graph.initializer, graph.value_info):
        for k in range(len(field) - 1, -1, -1):
            if field[k].name not in needed:
                del field[k]


def _tidy_linears(mp: onnx.ModelProto, linears: dict, attention: list[str] = ()) -> None:
    """Tag each Linear's MatMul (and bias Add) with its module path and give it the torch
    weights as initializers ``<path>.weight_t`` / ``<path>.bias``. Tag the two matmuls of each
    eager attention module in ``attention``, in graph order ``<path>.qk_matmul`` (Q K^T) and
    ``<path>.av_matmul`` (P V), the keys quant.instrument gives them."""
    g = mp.graph
    consts = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen = set()
    new_inits = []  # (name, array) in graph order, added after the existing initializers
    attn: dict[str, list] = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = [s[len(_WRAP) + 1:] for s in _scopes(node) if s.startswith(_WRAP + ".")]
        paths = [p for p in scopes if p in linears]
        if not paths:
            if scopes and scopes[-1] in attention and node.op_type == "MatMul":
                attn.setdefault(scopes[-1], []).append(node)
            continue
        path = paths[-1]
        if node.op_type == "Gemm":
            raise NotImplementedError(f"{path}: exported as Gemm; only MatMul (+ Add) is handled")
        if path in seen:
            raise ValueError(f"{path}: called more than once in the graph; one QDQ point per Linear")
        b_in = node.input[1]
        src = producer.get(b_in)
        if b_in not in consts and not (src is not None and all(i in consts for i in src.input)):
            raise ValueError(f"{path}: MatMul input 1 ({b_in}) is not a constant weight")
        seen.add(path)
        w, b = linears[path]
        node.input[1] = f"{path}.weight_t"
        node.name = f"{path}/MatMul"
        _set_tag(node, path)
        new_inits.append((f"{path}.weight_t", w, True))
        if b is not None:
            adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"
                    and path in [s[len(_WRAP) + 1:] for s in _scopes(n)]]
            if len(adds) != 1:
                raise ValueError(f"{path}: expected one bias Add after the MatMul, found {len(adds)}")
            add = adds[0]
            k = 1 if add.input[0] == node.output[0] else 0
            add.input[k] = f"{path}.bias"
            add.name = f"{path}/Add"
            _set_tag(add, path)
            new_inits.append((f"{path}.bias", b, False))
    missing = sorted(set(linears) - seen)
    if missing:
        raise ValueError(f"Linear modules not found in the exported graph: {missing[:5]}")
    for path, nodes in attn.items():
        if len(nodes) == 2:  # eager attention: MatMul(Q, K^T) ... Softmax ... MatMul(P, V)
            for node, op in zip(nodes, ("qk_matmul", "av_matmul")):
                node.name = f"{path}.{op}/MatMul"
                _set_tag(node, f"{path}.{op}", MATMUL_TAG)
    # One tensor at a time straight into the graph: a list of protos extended into it held every
    # weight twice (protobuf copies on extend), 2.7x the Linears at the peak (measured).
    for name, a, transpose in new_inits:
        g.initializer.add().CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a.T) if transpose else a, name))
    prune_unused(g)


def _attention_paths(model) -> list[str]:
    """Attention modules (as quant.instrument finds them: they have num_key_value_groups and
    scaling)."""
    return [n for n, m in model.named_modules()
            if hasattr(m, "num_key_value_groups") and hasattr(m, "scaling")]


def float_graph(model, *, seq_len: int = 16, batch: int = 2, dynamic: bool = True,
                opset: int = OPSET, optimize: bool | None = None) -> onnx.ModelProto:
    """The float graph of ``export_float_onnx``, in memory (``quant.qdq.export_qdq`` builds on it):
    torch.onnx.export (dynamo) + tidy. The example batch is >= 2: a batch of 1 is specialized to a
    static dimension by torch.export. Attention is exported as HF's eager math (Q K^T,
    scale, mask, softmax, P V), which is what quant.instrument fake-quantizes, so its two matmuls
    can carry QDQ too (SDPA's export scales Q and K by sqrt(scale) before the matmul instead).

    ``optimize``: run the exporter's graph optimizer (default: for models up to
    ``EXTERNAL_THRESHOLD`` bytes of weights). It folds every Linear's weight transpose into a new
    copy, and its peak was 5x the weights on Qwen2.5-0.5B (10 GB, bench/large_models.py); without
    it the graph has more nodes (ORT folds them at load) and the same logits, bit for bit (tested)."""
    import tempfile

    model = model.eval()
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    import torch

    ids = torch.zeros((max(batch, 2) if dynamic else batch, seq_len), dtype=torch.long)
    kw = {}
    if dynamic:
        kw["dynamic_shapes"] = {"input_ids": {0: torch.export.Dim("batch"),
                                              1: torch.export.Dim("seq")}}
    if optimize is None:
        optimize = sum(p.numel() * p.element_size() for p in model.parameters()) <= EXTERNAL_THRESHOLD
    # Through a file with external data whatever the size (protobuf cannot hold a graph past 2 GB),
    # loaded without it: the exporter's copies of the Linear weights are pruned by the tidy step
    # before they are ever read, so the tidy graph costs the model's size once, not twice.
    try:
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "float.onnx"
            with torch.no_grad():
                torch.onnx.export(_logits_only(model).eval(), (ids,), str(f), dynamo=True,
                                  opset_version=opset, input_names=["input_ids"],
                                  output_names=["logits"], verbose=False, external_data=True,
                                  optimize=optimize, **kw)
            mp = load_onnx(f, load_external_data=False)
            _tidy_linears(mp, float_linears(model), _attention_paths(model))
            load_external(mp, tmp)
    finally:
        if attn_impl is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_impl)
    return mp


def export_float_onnx(model, path, *, seq_len: int = 16, batch: int = 2, dynamic: bool = True,
                      opset: int = OPSET, external_threshold: int = EXTERNAL_THRESHOLD,
                      optimize: bool | None = None) -> Path:
    """Write the float ONNX graph ``input_ids (batch, seq) int64 -> logits (batch, seq, vocab)``.

    ``dynamic`` makes batch and sequence symbolic (``seq_len``/``batch`` only shape the example);
    otherwise the graph is fixed to ``(batch, seq_len)``. SmolLM2 takes 40 s on an idle machine,
    3-4 minutes on a busy one (measured). Past ``external_threshold`` bytes of weights the graph
    is written with external data (``quant.onnxfile``).
    """
    mp = float_graph(model, seq_len=seq_len, batch=batch, dynamic=dynamic, opset=opset, optimize=optimize)
    return save_onnx(mp, path, external_threshold=external_threshold)


def embedding_gathers(mp: onnx.ModelProto) -> list[tuple[object, str]]:
    """``(Gather node, module path)`` of each token embedding: a Gather of a 2-D initializer by the
    graph input ``input_ids`` (the path from the exporter's scopes, e.g. ``model.embed_tokens``)."""
    inits = {t.name: len(t.dims) for t in mp.graph.initializer}
    inputs = {i.name for i in mp.graph.input}
    out = []
    for n in mp.graph.node:
        if n.op_type == "Gather" and inits.get(n.input[0]) == 2 and n.input[1] in inputs \
                and all(a.name != "axis" or a.i == 0 for a in n.attribute):
            scopes = [s[len(_WRAP) + 1:] for s in _scopes(n) if s.startswith(_WRAP + ".")]
            out.append((n, scopes[-1] if scopes else n.input[0]))
    return out


def linear_paths(mp: onnx.ModelProto) -> list[str]:
    """Module paths of the Linears in a graph written by this module, in graph order."""
    return [node_tag(n) for n in mp.graph.node if n.op_type == "MatMul" and node_tag(n)]


def matmul_paths(mp: onnx.ModelProto) -> list[str]:
    """``<attention path>.qk_matmul`` / ``.av_matmul`` of the attention matmuls, in graph order."""
    return [node_tag(n, MATMUL_TAG) for n in mp.graph.node if node_tag(n, MATMUL_TAG)]

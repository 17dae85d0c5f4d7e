"""Attach fake quantizers to any Hugging Face causal LM whose projections are nn.Linear.

One verb, configuration as data (as torchao's ``quantize_(model, config)``): ``quantize_`` replaces
every nn.Linear (``lm_head`` included) by a ``QuantLinear`` holding the original Linear, an input and a
weight ``FakeQuantizer``. The quantization points are keyed ``<module path>:input`` and
``<module path>:weight`` (design.md section 5), the keys of QParams and of the ONNX name map.

With ``attention_matmuls=True`` the two attention matmuls are quantized too: each attention module
gets ``qk_matmul`` and ``av_matmul`` (``QuantMatMul``: ``torch.matmul(input, other)`` with both operands
fake-quantized, keys ``<module path>:input`` and ``<module path>:other``), run by an eager attention
function registered with transformers' AttentionInterface (HF's own eager math: Q K^T, times the
scaling, plus the mask, float32 softmax, then P V).

A FakeQuantizer is in one of three modes:

- ``float``: identity (activations start here until they have qparams);
- ``quant``: ``quant.affine.fake_quant`` with its scale/zero-point buffers, the runtime's exact math
  (round half to even, saturation), since an ONNX Runtime integer model is compared against it;
  gradients pass straight through inside the range;
- ``learn``: LSQ+ (``quant.lsq``) with trainable ``(log_s, beta)`` started from the buffers; leaving
  the mode writes the learned values back as an affine ``(s, z)``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from quant import lsq
from quant.affine import broadcast_param, fake_quant, range_to_qparams, tensor_range
from quant.qparams import PER_TOKEN_META, ROTATED_META, PointParams, QParams, model_fingerprint, rotated_linears
from quant.rotation import ROTATION_META, check_block, rotate_torch, rotation_of
from quant.spec import QuantSpec, activation_spec, weight_spec

Mode = Literal["float", "quant", "learn"]
Which = Literal["activations", "weights", "all"]


class QuantConfig(BaseModel):
    """What to quantize and how.

    ``overrides`` maps a point key or an fnmatch pattern over keys (``"*.down_proj:input"``) to a
    spec: an exact key wins, otherwise the last matching pattern (later entries refine earlier ones).
    ``skip`` lists fnmatch patterns over module paths (``"lm_head"``) left in float.
    ``per_token`` lists fnmatch patterns over Linear paths (``"*.down_proj"``) whose input is
    quantized per token at run time (``PerTokenQuantizer``) instead of at a QParams point: no
    statistics, no range, nothing learned there (``quant.qdq.per_token_inputs`` says why).
    ``per_token_rotation`` (a power of two; 0: none) rotates those inputs and their weights by a
    block Hadamard transform first (``quant.rotation``). ``rotate`` lists fnmatch patterns over the
    other Linears (static inputs, a QParams point each) whose input and weight are rotated so by
    the same block before they are quantized (QuaRot's rotation for a static-range NPU: the point's
    range is of ``(x / m) R``, the weight's of ``(W * m) R``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    activation: QuantSpec = activation_spec(8)
    weight: QuantSpec = weight_spec(8)
    overrides: dict[str, QuantSpec] = {}
    skip: list[str] = []
    per_token: list[str] = []
    per_token_rotation: int = 0
    rotate: list[str] = []
    attention_matmuls: bool = False
    embedding: Literal["int8", "float"] = Field("int8", description="the token embedding as the QDQ "
                                                "graph stores it (quant.qdq.embedding_table)")

    @field_validator("overrides")
    @classmethod
    def _keys_name_points(cls, v: dict[str, QuantSpec]) -> dict[str, QuantSpec]:
        bad = [k for k in v if not k.endswith((":input", ":other", ":weight"))]
        if bad:
            raise ValueError(f"override keys are '<module pattern>:input', ':other' or ':weight', got {bad}")
        return v

    @field_validator("skip", "per_token", "rotate")
    @classmethod
    def _names_modules(cls, v: list[str], info) -> list[str]:
        bad = [p for p in v if ":" in p]
        if bad:
            raise ValueError(f"{info.field_name} takes module patterns, without ':input' and the like, got {bad}")
        return v

    @field_validator("per_token_rotation")
    @classmethod
    def _rotation_block(cls, v: int) -> int:
        return check_block(v)

    def spec_for(self, key: str) -> QuantSpec:
        if key in self.overrides:
            return self.overrides[key]
        matched = [spec for pat, spec in self.overrides.items() if fnmatch.fnmatchcase(key, pat)]
        if matched:
            return matched[-1]
        return self.weight if key.endswith(":weight") else self.activation


class _FakeQuantSTE(torch.autograd.Function):
    """``quant.affine.fake_quant`` forward (bit exact); straight-through gradient inside the range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):
        s = broadcast_param(scale.to(x.dtype), spec, tuple(x.shape))
        z = broadcast_param(zero_point, spec, tuple(x.shape))
        r = torch.round(x / s) + z
        ctx.save_for_backward((r >= spec.qmin) & (r <= spec.qmax))
        return fake_quant(x, scale, zero_point, spec)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None


class FakeQuantizer(nn.Module):
    """One quantization point: its spec, ``scale``/``zero_point`` buffers (ONNX layout) and a mode."""

    def __init__(self, key: str, spec: QuantSpec, param_shape: tuple[int, ...]):
        super().__init__()
        self.key = key
        self.spec = spec
        self.register_buffer("scale", torch.ones(param_shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.full(param_shape, spec.symmetric_zero_point
                                                      if spec.symmetric else 0, dtype=torch.int32))
        self.mode: Mode = "float"
        self.calibrated = False  # buffers hold real qparams (not the placeholders above)
        self.log_s: nn.Parameter | None = None
        self.beta: nn.Parameter | None = None
        self.capture: Callable[[str, torch.Tensor], None] | None = None

    @property
    def kind(self) -> str:
        return "weights" if self.key.endswith(":weight") else "activations"

    def extra_repr(self) -> str:
        return f"{self.key}, {self.spec.short()}, mode={self.mode}"

    def set_qparams(self, scale, zero_point, spec: QuantSpec | None = None) -> None:
        """Load ``(s, z)``; a new ``spec`` may change the parameter shape. The first qparams of a
        point switch it from float to quant; a learning point restarts from them."""
        spec = spec or self.spec
        z = np.asarray(zero_point)
        if np.any(z != np.rint(z)) or np.any(z < spec.qmin) or np.any(z > spec.qmax):
            raise ValueError(f"{self.key}: zero_point must be integers in [{spec.qmin}, {spec.qmax}]")
        PointParams(spec, scale, z).validate(self.key)  # shapes, positive scales, symmetric z
        self.spec = spec
        dev = self.scale.device
        self.scale = torch.tensor(np.asarray(scale, dtype=np.float32), device=dev)
        self.zero_point = torch.tensor(np.asarray(zero_point).astype(np.int32), device=dev)
        if not self.calibrated and self.mode == "float":
            self.mode = "quant"
        self.calibrated = True
        if self.mode == "learn":
            self._start_learning()

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """Current ``(s, z)``; in learn mode derived from ``(log_s, beta)`` (lsq.to_qparams)."""
        if self.mode == "learn":
            return lsq.to_qparams(self.log_s, self.beta, self.spec)
        return (self.scale.detach().cpu().numpy().copy(),
                self.zero_point.detach().cpu().numpy().astype(self.spec.numpy_dtype))

    def set_mode(self, mode: Mode) -> None:
        if mode not in ("float", "quant", "learn"):
            raise ValueError(f"mode is 'float', 'quant' or 'learn', got {mode!r}")
        if mode != "float" and not self.calibrated:
            raise ValueError(f"{self.key}: no qparams yet; calibrate or set_qparams before '{mode}'")
        if self.mode == "learn" and mode != "learn":
            s, z = self.qparams()  # commit what was learned as an affine (s, z)
            self.log_s = self.beta = None
            self.scale.copy_(torch.as_tensor(s))
            self.zero_point.copy_(torch.as_tensor(z.astype(np.int32)))
        previous, self.mode = self.mode, mode
        if mode == "learn" and previous != "learn":
            self._start_learning()

    def _start_learning(self) -> None:
        log_s, beta = lsq.init_from_qparams(self.scale.cpu().numpy(), self.zero_point.cpu().numpy(),
                                            self.spec)
        self.log_s = nn.Parameter(log_s.to(self.scale.device))
        self.beta = None if self.spec.symmetric else nn.Parameter(beta.to(self.scale.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture(self.key, x.detach())
        if self.mode == "float":
            return x
        if self.mode == "learn":
            return lsq.lsq_fake_quant(x, self.log_s, self.beta, self.spec)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FakeQuantSTE.apply(x, self.scale, self.zero_point, self.spec)
        return fake_quant(x, self.scale, self.zero_point, self.spec)


PER_TOKEN_QMAX = 127


class _PerTokenSTE(torch.autograd.Function):
    """The per-token values forward (bit exact), the gradient passed straight through."""

    @staticmethod
    def forward(ctx, x):
        s = torch.clamp(x.abs().amax(-1, keepdim=True) / PER_TOKEN_QMAX, min=torch.finfo(torch.float32).tiny)
        return torch.round(x / s) * s

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out


def per_token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """``round(x / s_t) * s_t`` with ``s_t = max_k |x_tk| / 127`` per token (last axis): what
    ``quant.qdq.per_token_inputs`` computes in integers. Straight-through gradient."""
    return _PerTokenSTE.apply(x)


class PerTokenQuantizer(nn.Module):
    """The input of a Linear quantized per token at run time: not a QParams point (``quant_points``
    does not list it), it follows the activations' mode (float: identity)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.mode: Mode = "float"

    def extra_repr(self) -> str:
        return f"{self.key}, s8 sym per token (dynamic), mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mode == "float" else per_token_fake_quant(x)


class QuantLinear(nn.Module):
    """An nn.Linear with fake-quantized input and weight: ``F.linear(fq(x / m), fq(W * m), b)``.

    ``smooth`` (default None) is the per-input-channel SmoothQuant factor m (Xiao et al., 2023):
    dividing the input and multiplying the weight columns leaves the float output unchanged and
    moves activation outliers into the weights. ``rotation`` (a block; 0: none): the input after
    the Div and the weight ``W * m`` are both rotated by ``quant.rotation.rotate`` (same float
    product), and those are what is quantized, per token or at the input's point. The Linear is
    kept as it is (no copy), so a tied ``lm_head`` keeps sharing the embedding's Parameter and is
    quantized in the forward only.

    ``cache_weight``: in quant mode the fake-quantized weight is kept between forwards (one extra
    copy of the weight) until the weight, the smoothing factors or the qparams change, in place or
    rebound; fake-quantizing all of SmolLM2's weights costs seconds per forward on one core.
    """

    cache_weight = True

    def __init__(self, linear: nn.Linear, path: str, act_spec: QuantSpec, w_spec: QuantSpec,
                 per_token: bool = False, rotation: int = 0):
        super().__init__()
        self.linear = linear
        self.rotation = rotation   # quant.rotation: 0, or the block of x R and (W * m) R
        self.input_quantizer = PerTokenQuantizer(f"{path}:input") if per_token else \
            FakeQuantizer(f"{path}:input", act_spec, act_spec.param_shape(()))
        self.weight_quantizer = FakeQuantizer(f"{path}:weight", w_spec,
                                              w_spec.param_shape(tuple(linear.weight.shape)))
        self.register_buffer("smooth", None)
        self.importance: np.ndarray | None = None   # QParams.importance: the weight ranged by it
        self._cache: tuple | None = None  # (state the cached weight was made from, that weight)
        self.calibrate_weight()
        self.weight_quantizer.set_mode("quant")

    # Read-only views of the wrapped Linear, for code that inspects lm_head.weight and the like.
    weight = property(lambda self: self.linear.weight)
    bias = property(lambda self: self.linear.bias)
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)
    per_token = property(lambda self: isinstance(self.input_quantizer, PerTokenQuantizer),
                         doc="whether the input is quantized per token at run time (no point)")

    def effective_weight(self) -> torch.Tensor:
        w = self.linear.weight
        w = w if self.smooth is None else w * self.smooth.to(w.dtype)
        return rotate_torch(w, self.rotation) if self.rotation else w

    def calibrate_weight(self) -> None:
        """Min-max weight qparams at the spec's granularity (what a weight needs: no data); with
        ``importance``, the range the server and the devices derive from it
        (``quant.smoothing.smoothed_weight_point``, in numpy on the same float32 values)."""
        spec = self.weight_quantizer.spec
        if self.importance is None:
            s, z = range_to_qparams(*tensor_range(self.effective_weight(), spec), spec)
        else:
            from quant.smoothing import smoothed_weight_point

            m = None if self.smooth is None else self.smooth.detach().cpu().numpy()
            p = smoothed_weight_point(self.linear.weight.detach().cpu().float().numpy(), m, spec, self.rotation,
                                      self.importance)
            s, z = p.scale, p.zero_point
        self.weight_quantizer.set_qparams(s, z)

    def set_smooth(self, factors) -> None:
        """Set (or clear, with None) the smoothing factors and re-derive the weight qparams."""
        if factors is None:
            self.smooth = None
        else:
            f = torch.as_tensor(np.asarray(factors, dtype=np.float32), device=self.linear.weight.device)
            if f.shape != (self.linear.in_features,) or not torch.all(torch.isfinite(f) & (f > 0)):
                raise ValueError(f"smoothing factors must be {self.linear.in_features} positive floats")
            self.smooth = f
        self.calibrate_weight()

    def quantized_weight(self) -> torch.Tensor:
        q, w, m = self.weight_quantizer, self.linear.weight, self.smooth
        if q.mode != "quant" or not self.cache_weight or (torch.is_grad_enabled() and w.requires_grad):
            self._cache = None
            return q(self.effective_weight())
        state = (w, w._version, m, None if m is None else m._version, q.scale, q.scale._version,
                 q.zero_point, q.zero_point._version, q.spec)
        if self._cache is None or not all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(self._cache[0], state)):
            self._cache = (state, q(self.effective_weight()))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotation:
            x = rotate_torch(x, self.rotation)
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.linear.bias)


class QuantEmbedding(nn.Module):
    """The token embedding as the QDQ graph computes it (``quant.qdq.embedding_table``): tied to a
    QuantLinear whose weight is 8-bit per row (SmolLM2's lm_head), row r is lm_head's fake-quantized
    ``W * m`` row (``(W * m) R`` rotated back, for a per-token lm_head) divided by ``m``, so it
    moves with lm_head's weight qparams and smoothing; else
    its own int8 rows with min-max scales from the float table (fixed: not a QParams point). Float
    while ``ref`` (a weight quantizer of the model) is in float mode."""

    def __init__(self, embedding: nn.Embedding, head: "QuantLinear | None", ref: "FakeQuantizer"):
        super().__init__()
        self.embedding = embedding
        self._head = [head]  # lists, not submodules: the head and its points belong to lm_head
        self._ref = [ref]
        self.register_buffer("table", None, persistent=False)

    weight = property(lambda self: self.embedding.weight)

    def shared_head(self) -> "QuantLinear | None":
        """The tied head whose rows the table is, while its weight is 8-bit per row (a
        mixed-precision plan may promote it to that in a run: the choice follows its spec;
        ``quant.qdq._shared_head``)."""
        head = self._head[0]
        return head if head is not None and _shares_rows(head.weight_quantizer.spec) else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._ref[0].mode == "float":
            return self.embedding(ids)
        head = self.shared_head()
        if head is None:
            if self.table is None:
                from quant.qdq import EMBEDDING_SPEC  # onnx + numpy only

                w = self.embedding.weight.detach().float()
                s, z = range_to_qparams(*tensor_range(w, EMBEDDING_SPEC), EMBEDDING_SPEC)
                self.table = fake_quant(w, s, z, EMBEDDING_SPEC)
            return F.embedding(ids, self.table)
        rows = F.embedding(ids, head.quantized_weight())
        if head.rotation:   # a per-token head computes with (W * m) R
            rows = rotate_torch(rows, head.rotation, inverse=True)
        m = head.smooth
        return rows if m is None else rows / m.to(rows.dtype)


def _shares_rows(spec: QuantSpec) -> bool:
    return spec.bits == 8 and spec.granularity == "per_channel" and spec.resolved_axis(2) == 0


def _tied_head(embedding: nn.Embedding, replacements) -> "QuantLinear | None":
    """The QuantLinear that shares the embedding's weight (whatever its spec: ``shared_head``)."""
    for _, ql in replacements:
        if ql.linear.weight is embedding.weight:
            return ql
    return None


class QuantMatMul(nn.Module):
    """``torch.matmul(input, other)`` of two activations, both fake-quantized (per tensor)."""

    def __init__(self, path: str, input_spec: QuantSpec, other_spec: QuantSpec):
        super().__init__()
        self.input_quantizer = FakeQuantizer(f"{path}:input", input_spec, ())
        self.other_quantizer = FakeQuantizer(f"{path}:other", other_spec, ())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_quantizer(a), self.other_quantizer(b))


ATTN_IMPLEMENTATION = "fedquant_eager"
# Model families whose eager attention is exactly the function below (no logit softcapping, no
# attention sinks); others are refused rather than silently computed differently.
_EAGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _quant_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager_attention_forward (Llama, Qwen2) with QK^T and PV through QuantMatMul."""
    n_rep = module.num_key_value_groups
    if n_rep > 1:  # HF repeat_kv
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    qk, av = getattr(module, "qk_matmul", torch.matmul), getattr(module, "av_matmul", torch.matmul)
    scores = qk(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = av(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in _EAGER_FAMILIES or not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(
            f"attention_matmuls=True supports the eager attention of {_EAGER_FAMILIES} models "
            f"(transformers AttentionInterface); this model is {family!r}")
    found = [(n, m) for n, m in model.named_modules()
             if hasattr(m, "num_key_value_groups") and hasattr(m, "scaling")]
    if not found:
        raise NotImplementedError("attention_matmuls=True: no attention module found")
    return found


def _use_quant_attention(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _quant_eager_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def _quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> list[str]:
    """Replace every nn.Linear of ``model`` (in place) by a QuantLinear; return the point keys.

    Weight quantizers get min-max qparams now and start in quant mode; input quantizers start in
    float mode until they get qparams. Everything is checked before the model is touched. The keys
    are the Linear points in module order, then the attention matmul points if asked for (which
    also switches the model to the ``fedquant_eager`` attention implementation).
    """
    config = config or QuantConfig()
    if quant_points(model):
        raise ValueError("model is already quantized (it has fake quantizers); start from a float model")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matmuls = []  # (attention module, attribute, path)
    if config.attention_matmuls:
        matmuls = [(m, op, f"{n}.{op}") for n, m in _attention_modules(model)
                   for op in ("qk_matmul", "av_matmul")]
    names = [n for n, _ in linears] + [p for _, _, p in matmuls]
    for pat in config.skip:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"skip pattern {pat!r} matches no nn.Linear (or attention matmul) of the model")

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in config.skip)

    chosen = [(n, m) for n, m in linears if not skipped(n)]
    matmuls = [(m, op, p) for m, op, p in matmuls if not skipped(p)]
    per_token = set()
    for pat in config.per_token:
        hit = {n for n, _ in chosen if fnmatch.fnmatchcase(n, pat)}
        if not hit:
            raise ValueError(f"per_token pattern {pat!r} matches no quantized nn.Linear of the model")
        per_token |= hit
    rotated = set()
    for pat in config.rotate:
        hit = {n for n, _ in chosen if fnmatch.fnmatchcase(n, pat)} - per_token
        if not hit:
            raise ValueError(f"rotate pattern {pat!r} matches no quantized nn.Linear of the model with a static "
                             "input (per-token inputs are rotated by per_token_rotation)")
        rotated |= hit
    if rotated and not config.per_token_rotation:
        raise ValueError(f"rotate names {len(rotated)} Linears but per_token_rotation (the block) is 0")
    for n in sorted(per_token):
        w = config.spec_for(f"{n}:weight")
        if not (w.bits == 8 and w.signed and (w.granularity == "per_tensor" or
                                              (w.granularity == "per_channel" and w.axis in (0, -2)))):
            raise ValueError(f"{n}: a per-token input needs an int8 weight per tensor or per output channel "
                             f"(ONNX Runtime's MatMulInteger), got {w.short()}")
    keys = [f"{n}:{kind}" for n, _ in chosen for kind in ("input", "weight") if (n, kind) not in
            {(p, "input") for p in per_token}]
    keys += [f"{p}:{kind}" for _, _, p in matmuls for kind in ("input", "other")]
    for key in keys:
        spec = config.spec_for(key)
        if not key.endswith(":weight") and spec.granularity != "per_tensor":
            raise ValueError(f"{key}: activations are quantized per tensor, got {spec.short()}")
    for pat in config.overrides:
        if not any(fnmatch.fnmatchcase(k, pat) for k in keys):
            raise ValueError(f"override {pat!r} matches no quantization point of the model")

    replacements = []
    for name, linear in chosen:
        a_spec, w_spec = config.spec_for(f"{name}:input"), config.spec_for(f"{name}:weight")
        try:
            w_spec.param_shape(tuple(linear.weight.shape))
        except ValueError as e:
            raise ValueError(f"{name}:weight: {e}") from None
        block = config.per_token_rotation if name in per_token or name in rotated else 0
        replacements.append((name, QuantLinear(linear, name, a_spec, w_spec, per_token=name in per_token,
                                               rotation=block)))
    qmatmuls = [(m, op, QuantMatMul(p, config.spec_for(f"{p}:input"), config.spec_for(f"{p}:other")))
                for m, op, p in matmuls]
    for name, ql in replacements:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ql)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if config.embedding == "int8" and isinstance(emb, nn.Embedding) and replacements:
        head = _tied_head(emb, replacements)
        qe = QuantEmbedding(emb, head, (head or replacements[0][1]).weight_quantizer)
        path = next(n for n, m in model.named_modules() if m is emb)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, qe)
    for m, op, qm in qmatmuls:
        setattr(m, op, qm)
    if qmatmuls:
        _use_quant_attention(model)
    return keys


def quant_points(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every quantization point of the model, by key."""
    return {m.key: m for m in model.modules() if isinstance(m, FakeQuantizer)}


def fingerprint(model: nn.Module) -> str:
    """``model_fingerprint`` over the names and weight shapes of the model's Linear layers; the same
    before and after ``quantize_`` and whatever the config skips."""
    wrapped = _quant_linears(model)
    inner = {f"{n}.linear" for n in wrapped}
    shapes = [(n, tuple(m.weight.shape)) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, QuantLinear)) and n not in inner]
    return model_fingerprint(shapes)


def set_mode(model: nn.Module, mode: Mode, which: Which = "all") -> None:
    """Put the activation points, the weight points or all of them in ``mode``.

    ``learn`` also freezes every other parameter of the model (requires_grad False): LSQ learns only
    the ranges, with the weights fixed (design.md section 4).
    """
    if mode not in ("float", "quant", "learn"):
        raise ValueError(f"mode is 'float', 'quant' or 'learn', got {mode!r}")
    if which not in ("activations", "weights", "all"):
        raise ValueError(f"which is 'activations', 'weights' or 'all', got {which!r}")
    points = [q for q in quant_points(model).values() if which == "all" or q.kind == which]
    if mode != "float":
        missing = [q.key for q in points if not q.calibrated]
        if missing:
            raise ValueError(f"{len(missing)} points have no qparams yet (e.g. {missing[:3]}); "
                             f"set_qparams before mode {mode!r}")
    if mode == "learn":
        learned = {id(p) for p in learned_parameters(model)}
        for p in model.parameters():
            if id(p) not in learned:
                p.requires_grad_(False)
    for q in points:
        q.set_mode(mode)
    if which in ("activations", "all"):
        for m in model.modules():
            if isinstance(m, PerTokenQuantizer):
                m.mode = mode


def per_token_paths(model: nn.Module) -> list[str]:
    """The Linears whose input is quantized per token (``QuantConfig.per_token``)."""
    return sorted(n for n, m in _quant_linears(model).items() if m.per_token)


def rotated_paths(model: nn.Module) -> list[str]:
    """The Linears whose static input is rotated before its point (``QuantConfig.rotate``)."""
    return sorted(n for n, m in _quant_linears(model).items() if m.rotation and not m.per_token)


def learned_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``log_s`` (and, for asymmetric specs, ``beta``) of every point in learn mode."""
    for q in quant_points(model).values():
        if q.mode == "learn":
            yield q.log_s
            if q.beta is not None:
                yield q.beta


def get_qparams(model: nn.Module) -> QParams:
    """The model's current qparams (points without any yet are left out), smoothing factors and
    importance."""
    points = {}
    for key, q in quant_points(model).items():
        if q.calibrated:
            s, z = q.qparams()
            points[key] = PointParams(q.spec, s, z)
    smoothing = {n: m.smooth.detach().cpu().numpy().copy() for n, m in _quant_linears(model).items()
                 if m.smooth is not None}
    per_token = per_token_paths(model)
    meta = {PER_TOKEN_META: json.dumps(per_token)} if per_token else {}
    rotated = rotated_paths(model)
    if rotated:
        meta[ROTATED_META] = json.dumps(rotated)
    blocks = {m.rotation for m in _quant_linears(model).values() if m.rotation}
    if blocks:
        meta[ROTATION_META] = str(max(blocks))
    importance = {n: m.importance.copy() for n, m in _quant_linears(model).items() if m.importance is not None}
    return QParams(points, model=fingerprint(model), smoothing=smoothing, meta=meta, importance=importance)


def set_qparams(model: nn.Module, qp: QParams, strict: bool = True, respec: bool = False,
                rank_weights: bool = True) -> None:
    """Load ``qp`` into the model; all checks run first, so on failure nothing has changed.

    Strict: the fingerprint must be this model's, every key a point of it and every spec the
    point's own. Not strict: the fingerprint is not checked and unknown keys are ignored (specs and
    shapes of the known ones still are). Points not in ``qp`` keep their values. Importance and
    smoothing factors are applied first (re-deriving those weights' qparams: min-max, or ranged
    by the importance as the server and devices range them), then the points. ``respec``:
    a point may take another spec (a mixed-precision plan's), its scale shaped for that spec.
    Not ``rank_weights``: the importance is checked but not applied, every Linear's weight at
    min-max (for a job that never quantizes a weight: the plan job runs the float model, and
    ranging every weight by the importance searches each row of every Linear).
    """
    qp.validate()
    fp = fingerprint(model)
    if strict and qp.model != fp:
        raise ValueError(f"QParams are for model {qp.model!r}, this model is {fp!r}")
    points, linears = quant_points(model), _quant_linears(model)
    errors, updates, smooth, ranked = [], [], [], []
    if ROTATION_META in qp.meta:
        mine = max((m.rotation for m in linears.values()), default=0)
        if rotation_of(qp.meta) != mine:
            errors.append(f"per-token rotation block {rotation_of(qp.meta)} differs from the model's {mine}")
    if ROTATED_META in qp.meta and rotated_linears(qp) != rotated_paths(model):
        errors.append(f"rotated inputs {rotated_linears(qp)[:3]} differ from the model's {rotated_paths(model)[:3]}")
    for key, p in qp.points.items():
        q = points.get(key)
        if q is None:
            if strict:
                errors.append(f"{key}: not a quantization point of this model")
            continue
        if p.spec != q.spec and not respec:
            errors.append(f"{key}: spec {p.spec.short()} differs from the model's {q.spec.short()}")
            continue
        try:
            want = tuple(q.scale.shape) if p.spec == q.spec else p.spec.param_shape(
                tuple(linears[key.rsplit(":", 1)[0]].linear.weight.shape) if q.kind == "weights" else ())
        except (KeyError, ValueError) as e:
            errors.append(f"{key}: spec {p.spec.short()} does not fit the point ({e})")
            continue
        if p.scale.shape != want:
            errors.append(f"{key}: scale shape {p.scale.shape} != expected {want}")
        else:
            updates.append((q, p))
    for what, vectors, into in (("smoothing", qp.smoothing, smooth), ("importance", qp.importance, ranked)):
        for name, v in vectors.items():     # one value per input feature of a Linear of the model
            m = linears.get(name)
            if m is None:
                if strict:
                    errors.append(f"{what} {name}: not a quantized Linear of this model")
            elif np.asarray(v).shape != (m.in_features,):
                errors.append(f"{what} {name}: shape {np.asarray(v).shape} != ({m.in_features},)")
            else:
                into.append((m, v))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("QParams refused: " + "; ".join(errors[:5]) + more)
    if not rank_weights:    # back to min-max wherever an earlier job ranged them
        ranked = [(m, None) for m in linears.values() if m.importance is not None]
    for m, h in ranked:
        m.importance = None if h is None else np.asarray(h, dtype=np.float32)
        if not any(m is n for n, _ in smooth):
            m.calibrate_weight()
    for m, f in smooth:
        m.set_smooth(f)
    for q, p in updates:
        q.set_qparams(p.scale, p.zero_point, p.spec)


@contextlib.contextmanager
def capture_inputs(model: nn.Module, callback: Callable[[str, torch.Tensor], None],
                   keys: list[str] | None = None):
    """Within the block, every forward calls ``callback(key, x)`` with the float input of each
    activation point (after smoothing, before fake-quant), so statistics are gathered batch by
    batch without keeping activations around."""
    points = {k: q for k, q in quant_points(model).items() if q.kind == "activations"}
    chosen = list(points) if keys is None else list(keys)
    unknown = [k for k in chosen if k not in points]
    if unknown:
        raise ValueError(f"not activation points of this model: {unknown[:5]}")
    for k in chosen:
        points[k].capture = callback
    try:
        yield
    finally:
        for k in chosen:
            points[k].capture = None

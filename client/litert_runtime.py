"""A device whose runtime is LiteRT (TensorFlow Lite): the interpreter over a ``.tflite`` from
``quant.tflite``, scored with the same arithmetic as the ONNX Runtime device
(``quant.metrics.nll_sum_and_count``). Needs the ``fedquant[litert]`` extra (``ai-edge-litert``).

The ``.tflite`` has a fixed input shape ``[batch, seq_len]`` (int32 token ids); ``evaluate`` feeds
sequences of that length, padding the last batch with copies of its first row and scoring only
the real rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.runtime import captured_by_key
from quant.metrics import nll_sum_and_count


def litert_interpreter(model, threads: int = 1, xnnpack: bool = True):
    """A LiteRT interpreter over ``model`` (a path or the bytes of a ``.tflite``), tensors
    allocated. ``xnnpack=False`` runs TFLite's builtin kernels only (the reference kernels
    LiteRT falls back to where the XNNPACK delegate does not take an op)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:  # pragma: no cover - depends on the extra
        from quant.tflite import EXTRA_HINT

        raise ImportError(EXTRA_HINT) from e
    kw = {"num_threads": int(threads)}
    if not xnnpack:
        kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(model, (bytes, bytearray)):
        it = Interpreter(model_content=bytes(model), **kw)
    else:
        it = Interpreter(model_path=str(model), **kw)
    it.allocate_tensors()
    return it


class LiteRTRuntime:
    """The integer (or float) LiteRT model of one device: logits and held-out NLL."""

    def __init__(self, model, threads: int = 1, xnnpack: bool = True):
        self.path = None if isinstance(model, (bytes, bytearray)) else Path(model)
        self.interpreter = litert_interpreter(model, threads=threads, xnnpack=xnnpack)
        inp = self.interpreter.get_input_details()
        out = self.interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ValueError(f"{self.path or 'model'}: expected one input (token ids) and one output "
                             f"(logits), got {len(inp)} and {len(out)}")
        self._in, self._out = inp[0], out[0]
        self.batch, self.seq_len = (int(d) for d in self._in["shape"])

    def logits(self, ids) -> np.ndarray:
        """Float logits [batch, seq_len, vocab] for ids of exactly the model's input shape (an
        integer output, as a full-integer model has, is dequantized with its scale and zero
        point)."""
        ids = np.asarray(ids)
        if ids.shape != (self.batch, self.seq_len):
            raise ValueError(f"ids of shape {ids.shape}: this .tflite takes {(self.batch, self.seq_len)}")
        self.interpreter.set_tensor(self._in["index"], ids.astype(self._in["dtype"]))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._out["index"])
        if np.issubdtype(out.dtype, np.integer):
            scale, zero = self._out["quantization"]
            if not scale:
                raise ValueError(f"{self.path or 'model'}: integer logits without a scale")
            out = (out.astype(np.float32) - np.float32(zero)) * np.float32(scale)
        return out

    def evaluate(self, sequences) -> tuple[float, int]:
        """(summed next-token NLL, predicted tokens) over ``sequences`` [N, seq_len]."""
        seqs = np.asarray(sequences)
        if seqs.ndim != 2 or seqs.shape[1] != self.seq_len:
            raise ValueError(f"sequences of shape {seqs.shape}: this .tflite takes length {self.seq_len}")
        total, count = 0.0, 0
        for i in range(0, len(seqs), self.batch):
            ids = seqs[i:i + self.batch]
            n = len(ids)
            if n < self.batch:
                ids = np.concatenate([ids, np.repeat(ids[:1], self.batch - n, axis=0)])
            s, c = nll_sum_and_count(self.logits(ids)[:n], ids[:n])
            total, count = total + s, count + c
        return total, count


class LiteRTCapture:
    """The float ``.tflite`` (``quant.tflite.convert_float(model, None)``) with every Linear's
    float input exposed (``quant.tflite.expose_inputs``): the statistics of a LiteRT device,
    divided by the held smoothing factors as ``client.runtime.FloatCapture`` does, so that its
    statistics merge with ONNX Runtime devices' at the same keys. Any batch size: sequences are
    fed in the model's fixed batch, the last one padded and trimmed."""

    def __init__(self, float_tflite, weights: dict[str, np.ndarray], threads: int = 1):
        from quant.tflite import expose_inputs

        raw, self.tensors = expose_inputs(Path(float_tflite).read_bytes(), weights)
        self.interpreter = litert_interpreter(raw, threads=threads)
        inp = self.interpreter.get_input_details()[0]
        self._in = inp
        self.batch, self.seq_len = (int(d) for d in inp["shape"])
        self._outs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}

    def run(self, ids, keys, smoothing=None) -> dict[str, np.ndarray]:
        ids = np.asarray(ids)
        unknown = [k for k in keys if k not in self.tensors]
        if unknown:
            raise ValueError(f"not activation points of the float .tflite: {unknown[:5]}")
        if ids.ndim != 2 or ids.shape[1] != self.seq_len:
            raise ValueError(f"ids of shape {ids.shape}: this .tflite takes length {self.seq_len}")
        names = sorted({self.tensors[k] for k in keys})
        parts: dict[str, list] = {n: [] for n in names}
        for i in range(0, len(ids), self.batch):
            b = ids[i:i + self.batch]
            n = len(b)
            if n < self.batch:
                b = np.concatenate([b, np.repeat(b[:1], self.batch - n, axis=0)])
            self.interpreter.set_tensor(self._in["index"], b.astype(self._in["dtype"]))
            self.interpreter.invoke()
            for name in names:
                x = self.interpreter.get_tensor(self._outs[name])
                parts[name].append(x.reshape(self.batch, -1, x.shape[-1])[:n].copy())
        return captured_by_key({n: np.concatenate(v) for n, v in parts.items()}, self.tensors, keys, smoothing)


class LiteRTDevice:
    """A phone whose runtime is LiteRT, with the interface ``client.jobs`` and ``client.app`` use
    of ``client.runtime.DeviceRuntime`` (``qparams``, ``linears``, ``capture``, ``activation_keys``,
    ``activation_widths``, ``float_activations``, ``logits_width``, ``patch``, ``evaluate``): the
    statistics and scouting jobs run on the float ``.tflite`` (``LiteRTCapture``; ``capture`` may
    be one shared by the runtimes of a process), evaluation on the QDQ one, and a release's
    QParams are patched into the ``.tflite``'s quantization fields (``quant.tflite.patch_points``)
    without converting again. ``linears`` is ``{path: (weight, bias)}`` (a dict, or the bundle's
    ``client.runtime.FloatLinears``). A patch that a device would refuse raises
    ``client.runtime.PatchRefused`` and changes nothing; new smoothing factors are refused (they
    are constants of the converted graph)."""

    def __init__(self, model_tflite, float_tflite, qparams, linears, threads: int = 1,
                 capture: LiteRTCapture | None = None):
        self.path, self.float_path, self.threads = Path(model_tflite), Path(float_tflite), int(threads)
        self.qparams, self.linears = qparams, linears
        self.raw = self.path.read_bytes()
        self.runtime = LiteRTRuntime(self.raw, threads=self.threads)
        self._capture = capture
        self.last_patch: dict = {}

    @property
    def capture(self) -> LiteRTCapture:
        if self._capture is None:
            self._capture = LiteRTCapture(self.float_path, {p: w for p, (w, _) in self.linears.items()},
                                          threads=self.threads)
        return self._capture

    def activation_keys(self) -> list[str]:
        return sorted(k for k in self.qparams.points if not k.endswith(":weight"))

    def _weight_shape(self, path: str) -> tuple[int, ...]:
        shape = getattr(self.linears, "shape", None)     # FloatLinears reads the header only
        return tuple(shape(path)) if shape is not None else tuple(np.shape(self.linears[path][0]))

    def activation_widths(self) -> dict[str, int]:
        return {k: int(self._weight_shape(k.rsplit(":", 1)[0])[1]) for k in self.activation_keys()
                if k.rsplit(":", 1)[0] in self.linears}

    def logits_width(self) -> int:
        """The vocabulary the logits span: the ``.tflite``'s output width."""
        return int(self.runtime._out["shape"][-1])

    def float_activations(self, ids, keys, rotated: bool = True):
        # no rotated input reaches LiteRT (quant.tflite refuses them): ``rotated`` changes nothing
        return self.capture.run(ids, keys, self.qparams.smoothing)

    def _check(self, qp):
        """The merged QParams ``qp`` gives over the held ones, or PatchRefused naming every
        problem (``quant.qparams.qparams_problems``, the check of ``DeviceRuntime`` and of the
        server's commit, and new smoothing factors)."""
        from client.runtime import PatchRefused
        from quant.qparams import QParams, qparams_problems

        errors = qparams_problems(qp, self.qparams, {p: self._weight_shape(p)[1] for p in self.linears})
        held = self.qparams.smoothing
        changed = sorted(k for k, v in qp.smoothing.items()
                         if k not in held or not np.array_equal(np.asarray(v, np.float32), np.asarray(held[k], np.float32)))
        if changed:
            errors.append(f"new smoothing factors for {changed[:5]}: a LiteRT device needs a new conversion "
                          "for them (they are constants of the .tflite; leave LiteRT profiles out of "
                          "server.smoothing)")
        if qp.importance:
            errors.append(f"importance for {sorted(qp.importance)[:3]}: a LiteRT device derives no weight "
                          "points (leave LiteRT profiles out of server.weight_ranges)")
        if qp.codes:
            errors.append(f"codes for {sorted(qp.codes)[:3]}: a LiteRT device rounds its own weights "
                          "(leave LiteRT profiles out of server.gptq)")
        if errors:
            raise PatchRefused("QParams refused: " + "; ".join(errors))
        return QParams({**self.qparams.points, **qp.points}, self.qparams.model or qp.model, int(qp.version),
                       dict(held), {**self.qparams.meta, **qp.meta})

    def patch(self, qparams) -> dict:
        """Write ``qparams``' points into the held ``.tflite`` (and keep it as the new model): the
        scales and zero points of its activation points, its weight points re-quantized from the
        float weights (``W * m``), the biases of the Linears it touches re-derived. All checks run
        first; a refused patch (``PatchRefused``) changes nothing. Returns ``{total_s, points}``."""
        import time

        from client.runtime import PatchRefused
        from quant.qparams import QParams
        from quant.tflite import patch_points

        t0 = time.perf_counter()
        merged = self._check(qparams)
        sm = self.qparams.smoothing
        paths = {k.rsplit(":", 1)[0] for k in qparams.points}
        weights, biases = {}, {}
        for p in sorted(paths & set(self.linears)):
            w, b = self.linears[p]
            if f"{p}:weight" in qparams.points:
                weights[p] = (w * np.asarray(sm[p], np.float32) if p in sm else w).astype(np.float32)
            if b is not None:
                biases[p] = b
        try:
            raw = patch_points(self.raw, QParams(qparams.points), weights, biases)
            runtime = LiteRTRuntime(raw, threads=self.threads)
        except (KeyError, ValueError) as e:
            raise PatchRefused(f"QParams refused: {e}") from None
        self.raw, self.runtime, self.qparams = raw, runtime, merged
        self.last_patch = {"total_s": time.perf_counter() - t0, "points": len(qparams.points)}
        return self.last_patch

    def logits(self, ids) -> np.ndarray:
        return self.runtime.logits(ids)

    def evaluate(self, sequences, batch_size: int = 8) -> tuple[float, int]:
        """(summed NLL, tokens) on ``sequences``; the ``.tflite``'s batch is fixed, ``batch_size``
        is accepted for ``client.jobs.evaluate`` and ignored."""
        return self.runtime.evaluate(sequences)


def litert_available() -> bool:
    """Whether this Python has the LiteRT interpreter (the ``fedquant[litert]`` extra), without
    importing it."""
    from quant.tflite import missing_litert

    return not missing_litert(("ai_edge_litert",))

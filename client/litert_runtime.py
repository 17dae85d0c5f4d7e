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

"""The phone's mobile runtime: ONNX Runtime over the QDQ model (design.md section 5)."""

from __future__ import annotations

import os

import onnx


def ort_session(model, threads: int = 1, optimized_path=None, level: str = "all",
                nbits_accuracy: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads; ``optimized_path`` writes the
    graph ORT actually runs (after QDQ fusion) for inspection.

    ``nbits_accuracy``: when ORT fuses a weight DequantizeLinear + MatMul into MatMulNBits, its
    default (4) quantizes the float activations to int8 inside the kernel, silently turning a
    16-bit activation profile into 8 bits (measured 600 LSB of int16); 1 keeps them fp32.
    """
    import onnxruntime as ort

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
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

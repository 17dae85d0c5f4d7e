"""fedquant's quantization core: specs, the affine math, statistics, calibrators, learned ranges.

Knows nothing of Flower or ONNX Runtime (design.md section 2).
"""

from quant.affine import dequantize, fake_quant, quantize, range_to_qparams
from quant.qparams import PointParams, QParams, diff_qparams, load_qparams, save_qparams
from quant.spec import QuantSpec, activation_spec, weight_spec

# None of the names above imports torch: a phone that only scouts, collects statistics and
# evaluates on ONNX Runtime installs numpy and onnxruntime, not torch (design.md section 5).

__all__ = [
    "QuantSpec", "activation_spec", "weight_spec",
    "quantize", "dequantize", "fake_quant", "range_to_qparams",
    "PointParams", "QParams", "load_qparams", "save_qparams", "diff_qparams",
]

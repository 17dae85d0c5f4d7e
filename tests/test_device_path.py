"""A phone installs numpy and onnxruntime, not torch: the device path must import without it."""

import subprocess
import sys

BLOCK_TORCH = """
import builtins, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("torch is not installed on this device")
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import quant, quant.wire, quant.stats, quant.calibrate, quant.export, quant.qdq, quant.encodings
import quant.learn_config, quant.reconstruct
import client.runtime, client.jobs, client.profiles, client.app, client.device, client.updates
import client.learn_runtime
import numpy as np
from quant import QuantSpec, quantize, range_to_qparams
s, z = range_to_qparams(-1.0, 1.0, QuantSpec(bits=8, signed=False))
assert quantize(np.array([0.5], np.float32), s, z, QuantSpec(bits=8, signed=False))[0] == 191
assert "torch" not in sys.modules
print("ok")
"""


def test_device_path_imports_and_quantizes_without_torch():
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

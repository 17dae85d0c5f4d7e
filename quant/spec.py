"""What a quantized tensor is: bits, signedness, symmetry and granularity.

Conventions follow ONNX QuantizeLinear/DequantizeLinear (design.md section 3): integer ranges are
ONNX's, a per-channel spec names its axis, a per-group spec is ONNX's blocked quantization (opset 21)
with the group running along ``axis``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["per_tensor", "per_channel", "per_group"]

# The smallest scale we ever produce. 2^-24 is float16's smallest subnormal, so a scale survives a
# cast to any float type a runtime may store it in, and 1/s stays finite in float32.
SCALE_FLOOR = 2.0**-24


class QuantSpec(BaseModel):
    """How one tensor is quantized.

    >>> QuantSpec(bits=8, signed=False)            # an activation: asymmetric uint8, per tensor
    >>> QuantSpec(bits=8, symmetric=True, granularity="per_channel", axis=0)   # a Linear weight
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Literal[4, 8, 16] = Field(8, description="integer width: 4, 8 or 16")
    signed: bool = Field(True, description="int (True) or uint (False) storage")
    symmetric: bool = Field(False, description="zero-point fixed at the middle of the range")
    granularity: Granularity = "per_tensor"
    axis: int | None = Field(None, description="channel axis (per_channel) or blocked axis (per_group)")
    group_size: int | None = Field(None, description="elements per group along axis (per_group)")

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.granularity == "per_tensor":
            if self.axis is not None or self.group_size is not None:
                raise ValueError("per_tensor takes neither axis nor group_size")
        elif self.granularity == "per_channel":
            if self.axis is None:
                raise ValueError("per_channel needs an axis (the channel dimension, e.g. axis=0)")
            if self.group_size is not None:
                raise ValueError("per_channel takes no group_size (use per_group)")
        else:
            if self.axis is None or self.group_size is None:
                raise ValueError("per_group needs an axis and a group_size")
            if self.group_size < 2:
                raise ValueError(f"group_size must be at least 2, got {self.group_size}")
        return self

    # Integer range, as ONNX defines it for the storage type.
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def symmetric_zero_point(self) -> int:
        """z of a symmetric spec: 0 for signed, the middle (128 for uint8) for unsigned."""
        return 0 if self.signed else 2 ** (self.bits - 1)

    @property
    def qmax_symmetric(self) -> int:
        """Largest |q - z| a symmetric spec uses; int8 weights live in [-127, 127] (TFLite)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        """Container dtype for q; 4-bit values live in int8/uint8 containers."""
        return np.dtype({(4, True): np.int8, (4, False): np.uint8, (8, True): np.int8,
                         (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}[
            (self.bits, self.signed)])

    @property
    def onnx_type_name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    def param_shape(self, tensor_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of scale and zero-point for a tensor of ``tensor_shape`` (ONNX layout)."""
        if self.granularity == "per_tensor":
            return ()
        axis = self.resolved_axis(len(tensor_shape))
        if self.granularity == "per_channel":
            return (tensor_shape[axis],)
        n = tensor_shape[axis]
        if n % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide dimension {axis} of size {n}")
        shape = list(tensor_shape)
        shape[axis] = n // self.group_size
        return tuple(shape)

    def resolved_axis(self, ndim: int) -> int:
        """``axis`` as an index into a tensor of rank ``ndim`` (a negative axis counts from the end)."""
        axis = self.axis
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} out of range for a tensor of rank {ndim}")
        return axis % ndim

    def short(self) -> str:
        """A compact label: ``u8 asym tensor``, ``s4 sym group64@1``."""
        g = {"per_tensor": "tensor", "per_channel": f"channel@{self.axis}",
             "per_group": f"group{self.group_size}@{self.axis}"}[self.granularity]
        return f"{'s' if self.signed else 'u'}{self.bits} {'sym' if self.symmetric else 'asym'} {g}"


# Defaults by tensor class (design.md section 3; TFLite/XNNPACK conventions).
def weight_spec(bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> QuantSpec:
    """Weights of an nn.Linear (out, in): per output channel, or per group of ``group_size`` input
    elements. Symmetric signed by default; ``symmetric=False`` is unsigned with a zero point per
    channel or group (a 4-bit grid then spends all 16 levels on a skewed group's range)."""
    kind = dict(signed=True, symmetric=True) if symmetric else dict(signed=False, symmetric=False)
    if group_size:
        return QuantSpec(bits=bits, granularity="per_group", axis=1, group_size=group_size, **kind)
    return QuantSpec(bits=bits, granularity="per_channel", axis=0, **kind)


def activation_spec(bits: int = 8, signed: bool = False) -> QuantSpec:
    """Per-tensor activations: asymmetric 8-bit (uint8 by default, what ORT fuses on x86),
    symmetric int16 at 16 bits (the TFLite 16x8 convention)."""
    if bits == 16:
        return QuantSpec(bits=16, signed=True, symmetric=True)
    return QuantSpec(bits=bits, signed=signed, symmetric=False)

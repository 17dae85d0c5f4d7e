"""Device profiles: what a client's runtime executes and how much memory a job may use
(design.md section 4: the server keeps one QParams set per profile).

``runtime`` says which mobile runtime the profile's phones run: ONNX Runtime over the QDQ model
(``client.runtime``), or LiteRT over a ``.tflite`` with the same points (``client.litert_runtime``,
the optional ``fedquant[litert]`` extra; docs/litert.md). A LiteRT profile takes what
``quant.tflite`` exports: 8-bit per-tensor activations, int8 symmetric per-channel weights."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quant.configfile import load_config

FLOAT_BYTES = 4
RUNTIMES = ("onnxruntime", "litert")


class MemoryBudgetError(RuntimeError):
    """Even a batch of one sequence does not fit the profile's memory budget."""


class DeviceProfile(BaseModel):
    """One device class. Unknown fields are config errors (``extra="forbid"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    activation_bits: Literal[8, 16] = 8
    activation_signed: bool = False
    weight_bits: Literal[4, 8] = 8
    weight_group_size: int | None = Field(None, gt=0, description="None: per channel")
    weight_symmetric: bool = Field(True, description="false: unsigned weights with a zero point per "
                                   "channel or group")
    int16_activations: bool = False
    int8_weight_storage: Literal["auto", "int8", "uint8"] = Field(
        "auto", description="how the runtime stores 8-bit weights behind uint8 activations: auto picks "
        "int8 where ORT's u8 x s8 kernel is exact (x86 with VNNI, Arm), uint8 (q + 128) on x86 "
        "without VNNI, where it saturates (client.runtime.choose_weight_storage)")
    runtime: Literal["onnxruntime", "litert"] = Field(
        "onnxruntime", description="the phones' runtime: ONNX Runtime (QDQ .onnx) or LiteRT (.tflite, "
        "the fedquant[litert] extra); statistics of both merge at the same points")
    threads: int = Field(1, ge=1, le=64)
    memory_mb: float = Field(512.0, gt=0, description="budget for one job's exposed activations")

    @model_validator(mode="after")
    def _check(self) -> "DeviceProfile":
        if self.activation_bits == 16 and not self.int16_activations:
            raise ValueError("activation_bits = 16 needs int16_activations = true")
        if self.runtime == "litert":
            bad = [what for what, ok in (("activation_bits = 8", self.activation_bits == 8),
                                         ("int16_activations = false", not self.int16_activations),
                                         ("weight_bits = 8", self.weight_bits == 8),
                                         ("weight_group_size unset (per channel)", self.weight_group_size is None),
                                         ("weight_symmetric = true", self.weight_symmetric)) if not ok]
            if bad:
                raise ValueError(f"runtime = 'litert' takes the points quant.tflite exports (8-bit "
                                 f"activations, int8 symmetric per-channel weights): needs {', '.join(bad)}")
        return self


def load_profile(path: str | Path) -> DeviceProfile:
    """A DeviceProfile from TOML; errors (unknown key, bad value) are quant.configfile.ConfigError."""
    return load_config(path, DeviceProfile)


def estimate_bytes(batch: int, seq_len: int, widths: list[int]) -> int:
    """Float32 bytes of one run's exposed outputs: ``batch x seq x sum(widths) x 4``; with every
    width the widest this is the brief's ``batch x seq x widest x 4 x points``, a bound."""
    return int(batch) * int(seq_len) * int(sum(widths)) * FLOAT_BYTES


def plan_batch(requested: int, seq_len: int, widths: list[int], profile: DeviceProfile | None,
               what: str = "job", fixed_bytes: int = 0) -> int:
    """The largest batch <= ``requested`` whose estimate (plus ``fixed_bytes`` the job holds whatever
    its batch: a Hessian job's sums) fits ``profile.memory_mb`` (halving), or MemoryBudgetError when
    batch 1 does not fit. No profile: ``requested``."""
    if profile is None:
        return int(requested)
    budget = profile.memory_mb * 2**20
    b = max(1, int(requested))
    while b > 1 and estimate_bytes(b, seq_len, widths) + fixed_bytes > budget:
        b //= 2
    need = estimate_bytes(b, seq_len, widths)
    if need + fixed_bytes > budget:
        held = f" and {fixed_bytes / 2**20:.2f} MB of sums" if fixed_bytes else ""
        raise MemoryBudgetError(
            f"{what}: one sequence of {seq_len} tokens needs about {need / 2**20:.2f} MB of exposed "
            f"activations ({len(widths)} tensors, widest {max(widths, default=0)}){held}, over profile "
            f"{profile.name!r}'s budget of {profile.memory_mb} MB; shorten the sequences, expose "
            f"fewer points per run, or raise memory_mb")
    return b

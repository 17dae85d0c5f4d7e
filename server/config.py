"""The server's run configuration (design.md sections 4, 7, 8), validated from TOML by
``quant.configfile.load_config(path, ServerConfig)``.

A run is a schedule of rounds; each entry names its job and how many rounds of it run, how many
clients each samples and how many valid replies it needs to change anything. Example::

    seed = 1
    bins = 512
    [[schedule]]
    job = "scout"
    [[schedule]]
    job = "stats"
    repeat = 3
    fraction = 0.3
    min_replies = 2
    [[schedule]]
    job = "lsq"
    repeat = 5
    fraction = 0.2
    [calibrator]
    method = "mse"
    [learn]
    steps = 8
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from quant.calibrate import CalibratorConfig
from quant.learn_config import LearnConfig
from quant.mixed import MixedBudget
from quant.wire import MAX_BINS
from server.validate import ValidationConfig

# Fields that change how a run waits, not what it computes: a run may resume with other values.
OPERATIONAL = frozenset({"reply_timeout_s", "min_available", "wait_s"})


class RoundSpec(BaseModel):
    """One schedule entry: ``repeat`` rounds of ``job``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: Literal["scout", "stats", "lsq", "eval", "plan", "hessian"]
    repeat: int = Field(1, ge=1, description="rounds of this job in a row")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the roster sampled per round (of the round's `profiles`' "
                                                          "clients when it names some)")
    min_clients: int = Field(1, ge=1, description="sample at least this many, if available")
    min_replies: int = Field(1, ge=1, description="fewer valid replies: the round changes nothing")
    by_profile: bool = Field(False, description="sample fraction and min_clients within each device profile "
                                                "(stratified), so a small profile is never left out of a round")
    profiles: tuple[str, ...] | None = Field(None, min_length=1,
                                              description="the device profiles this round asks (default all): the "
                                                          "others sit it out and keep their parameters")

    @field_validator("profiles")
    @classmethod
    def _distinct_profiles(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"profiles repeat: {list(v)}")
        return v


class SmoothingConfig(BaseModel):
    """SmoothQuant in a run (design.md s. 4, outlier migration): the scouting round also collects
    each Linear input's per-channel abs-max; the server merges them by max, computes the factors
    from them and the float weights, and every later round runs on the smoothed model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(0.8, ge=0, le=1, description="migration strength: 0 none, 1 all into the weights")
    profiles: dict[str, float] = Field(default_factory=dict,
                                       description="per-profile alpha (a 4-bit weight takes less of the outliers)")
    skip_profiles: list[str] = Field(default_factory=list, description="profiles left unsmoothed")
    skip: dict[str, list[str]] = Field(default_factory=dict,
                                       description="per profile, Linear patterns (fnmatch) it leaves unsmoothed")
    min_factor: float = Field(1e-5, gt=0)
    max_factor: float = Field(1e5, gt=0)

    def alpha_for(self, profile: str) -> float | None:
        """The profile's migration strength, or None when it is not smoothed."""
        return None if profile in self.skip_profiles else self.profiles.get(profile, self.alpha)

    def skips(self, profile: str, path: str) -> bool:
        """Whether ``profile`` leaves the Linear ``path`` unsmoothed (``skip``)."""
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.skip.get(profile, ()))

    @model_validator(mode="after")
    def _bounds(self) -> "SmoothingConfig":
        if self.min_factor >= self.max_factor:
            raise ValueError(f"min_factor {self.min_factor} must be below max_factor {self.max_factor}")
        bad = {p: a for p, a in self.profiles.items() if not 0.0 <= a <= 1.0}
        if bad:
            raise ValueError(f"profiles: alpha must be in [0, 1], got {bad}")
        both = sorted(set(self.profiles) & set(self.skip_profiles))
        if both:
            raise ValueError(f"profiles {both} are both given an alpha and skipped")
        both = sorted(set(self.skip) & set(self.skip_profiles))
        if both:
            raise ValueError(f"profiles {both} are skipped whole and by Linear")
        bad = sorted(pat for pats in self.skip.values() for pat in pats if ":" in pat or not pat)
        if bad:
            raise ValueError(f"skip takes Linear patterns such as '*.down_proj', not point keys: {bad}")
        return self


class GptqConfig(BaseModel):
    """GPTQ's rounding of a profile's weights (``quant.gptq``) from the second moments of their inputs
    that the schedule's ``hessian`` rounds collect: the server rounds each weight of ``bits`` bits so
    that its Linear's output error on the fleet's text is least, and the QParams carry the codes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    damp: float = Field(0.01, ge=0, description="added to H's diagonal, as a fraction of its mean (the paper's 1%)")
    bits: int = Field(4, description="the weights of this width are rounded by GPTQ; the others to the nearest")

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {v}")
        return v


class SecureConfig(BaseModel):
    """Secure aggregation of the statistics rounds with Flower's SecAgg+ (Bell et al., CCS 2020;
    docs/privacy.md): the server learns the sum of the sampled clients' histograms, never one
    client's; and of the scouting rounds (``scout``), as sums that stand in for the maxima. Each client's counts are sent divided by ``cap`` (numbers in [0, 1]) and summed in
    fixed point: ``quantization_range`` levels over SecAgg+'s clipping range [-1, 1] (a count
    lands within ``cap / quantization_range`` of its value), modulo ``modulus_range`` (which must
    hold the sum of every client's levels)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cap: int = Field(1 << 24, ge=1, le=1 << 40,
                     description="values one client may count at one point; a point with more is scaled to it")
    num_shares: float = Field(1.0, gt=0, le=1, description="share of a round's clients each one shares its secret "
                                                            "with (SecAgg+'s neighbourhood)")
    reconstruction_threshold: float = Field(0.5, gt=0, le=1,
                                            description="share of those shares needed to recover a dropped client's masks")
    quantization_range: int = Field(1 << 30, ge=1 << 8, lt=1 << 31,
                                    description="fixed-point levels per value (< 2^31: Flower rounds in int32)")
    modulus_range: int = Field(1 << 48, ge=1 << 16, le=1 << 62, description="a power of 2")
    timeout_s: float | None = Field(None, gt=0, description="each protocol step's reply timeout (default reply_timeout_s)")
    scout: bool = Field(True, description="the scouting rounds too, in two SecAgg+ passes (quant.private_scout: "
                                          "log2 abs-max histograms, a power mean for the per-channel abs-max); "
                                          "false sends each client's scouting report in the clear")

    @model_validator(mode="after")
    def _sizes(self) -> "SecureConfig":
        if self.modulus_range & (self.modulus_range - 1):
            raise ValueError(f"modulus_range must be a power of 2, got {self.modulus_range}")
        if self.modulus_range <= 2 * self.quantization_range:
            raise ValueError("modulus_range must exceed 2 x quantization_range (it holds the sum of the clients' levels)")
        return self

    def max_clients(self) -> int:
        """Clients whose fixed-point sum fits the modulus (each sends levels up to quantization_range, plus
        its weight factor)."""
        return self.modulus_range // (self.quantization_range + 1) - 1


class DPConfig(BaseModel):
    """Differential privacy of the statistics rounds (docs/privacy.md, "Differential privacy";
    ``quant.dp``): each client sends its own calibrated range per point, as ``log2`` of its width
    over the round's starting QParams' and the shift of zero's place, clipped to L2 norm ``clip``;
    the server adds Gaussian noise of ``z 2 clip`` to each profile's sum and releases the noisy
    mean. A statistics round samples clients no earlier one used, so each client's data is in one
    release: the run spends the epsilon of one Gaussian mechanism (``server.privacy``, Flower's RDP
    accountant, replace-one). Alone, the noise is the server's (the release is private; the server
    sees each clipped vector). With ``secure`` too, each client adds a share of the noise before SecAgg+ masks its
    vector, and the server sees only the noisy sum (``server.privacy.secure_noise_share``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epsilon: float = Field(gt=0, le=1000, description="the run's budget for the statistics rounds")
    delta: float = Field(1e-5, gt=0, lt=1, description="keep it far below 1 / clients")
    clips: list[float] = Field([6.0, 1.5], min_length=1,
                               description="L2 clip per statistics round, in schedule order (the last one "
                                           "repeats): the first round starts from the random-token calibration, "
                                           "far off, later ones from the previous release. The defaults lie between "
                                           "the median and the 90th percentile of the clients' norms without noise "
                                           "on SmolLM2 (bench/dp_quality.py): chosen on the data, which a deployment "
                                           "should not do (docs/privacy.md)")

    @field_validator("clips")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not (math.isfinite(c) and c > 0) for c in v):
            raise ValueError(f"clips must be finite and > 0, got {v}")
        return v

    def noise_multiplier(self) -> float:
        """``z`` of one Gaussian release spending ``epsilon`` at ``delta`` (cached: the accountant
        takes seconds)."""
        return _noise_multiplier(self.epsilon, self.delta)


@functools.lru_cache(maxsize=16)
def _noise_multiplier(epsilon: float, delta: float) -> float:
    from server.privacy import noise_multiplier_for

    return noise_multiplier_for(epsilon, [1], 1, delta)


class ServerConfig(BaseModel):
    """Everything the server needs to run a federated quantization schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: list[RoundSpec]
    bins: int = Field(512, ge=2, le=MAX_BINS, description="histogram bins per activation point")
    grid_margin: float = Field(1.25, ge=1, description="grid half-width = margin x robust abs-max")
    grid_quantile: float = Field(0.9, gt=0, le=1, description="quantile of the clients' abs-max reports")
    widen_threshold: float = Field(1e-3, ge=0, lt=1,
                                   description="share of the values outside the grid that triggers widening")
    calibrator: CalibratorConfig = CalibratorConfig()
    profile_calibrators: dict[str, CalibratorConfig] = Field(
        default_factory=dict, description="per-profile calibrator (the best clipping depends on the bit widths)")
    smoothing: SmoothingConfig | None = Field(None, description="SmoothQuant factors from the scouting round")
    plans: dict[str, MixedBudget] = Field(
        default_factory=dict, description="per profile, the bit budget of the mixed-precision plan that the "
                                          "schedule's plan round chooses from the clients' sensitivities "
                                          "(quant.mixed.plan_mixed_precision)")
    weight_ranges: dict[str, Literal["minmax", "importance"]] = Field(
        default_factory=dict, description="per profile, how its weight points are ranged: 'minmax' (the "
                                          "default) or 'importance': the range with the least rounding "
                                          "error weighted per input column by the mean square the scouting "
                                          "round collects from every client (quant.weight_ranges)")
    gptq: dict[str, GptqConfig] = Field(
        default_factory=dict, description="per profile, GPTQ's rounding of its weights from the second moments the "
                                          "schedule's hessian rounds collect (quant.gptq); the codes travel in "
                                          "its QParams")
    # Aggregation rules (server/aggregate.py; README "A hostile fleet" says what they cost on an
    # honest fleet). The robust ones are the defaults: a phone fleet is hostile ground.
    stats_rule: Literal["sum", "trimmed"] = Field(
        "trimmed", description="per round and point: 'sum' pools the clients' histograms exactly; 'trimmed' "
                               "merges their distributions by a coordinate-wise trimmed mean of their CDFs "
                               "(each client counted as the median client's n)")
    absmax_rule: Literal["max", "clipped"] = Field(
        "clipped", description="scouting reports: 'max' as sent; 'clipped' caps each client's per-channel "
                               "abs-max and ranges at absmax_clip x the clients' lower median")
    absmax_clip: float = Field(4.0, ge=1, description="multiple of the clients' lower median (absmax_rule = clipped)")
    round_factor: float = Field(
        4.0, gt=1, description="with the robust rules, the most one round can stretch a range: a statistics "
                               "round's min/max are clamped to this multiple of the grid (so a grid widens by at "
                               "most this much), a learned-range round's step of log s to +-log(round_factor)")
    lsq_rule: Literal["mean", "median", "trimmed"] = "median"
    trim: float = Field(0.25, ge=0, lt=0.5,
                        description="share trimmed on each side (stats_rule = trimmed, lsq_rule = trimmed)")
    secure: SecureConfig | None = Field(None, description="secure aggregation of the scouting and statistics rounds "
                                                          "(SecAgg+); needs stats_rule = 'sum'")
    dp: DPConfig | None = Field(None, description="differential privacy of the statistics rounds: clients send "
                                                  "clipped ranges, the server adds noise (with secure: the "
                                                  "clients, in shares); needs stats_rule = 'sum'")
    server_opt: Literal["fedavg", "fedadam"] = "fedavg"
    server_lr: float = Field(1.0, gt=0)
    adam_b1: float = Field(0.9, ge=0, lt=1)
    adam_b2: float = Field(0.99, ge=0, lt=1)
    adam_eps: float = Field(1e-3, gt=0, description="FedAdam's tau (Reddi et al., 2021)")
    learn: LearnConfig = Field(default_factory=LearnConfig,
                               description="the learned-range job's knobs; the ones set are sent to lsq clients")
    batch_size: int = Field(8, ge=1)
    validation: ValidationConfig = ValidationConfig()
    seed: int = Field(0, ge=0)
    reply_timeout_s: float = Field(600.0, gt=0)
    min_available: int = Field(1, ge=1, description="nodes to wait for before the first round")
    wait_s: float = Field(300.0, ge=0, description="how long to wait for them")

    @field_validator("learn")
    @classmethod
    def _learn_is_json(cls, v: LearnConfig) -> LearnConfig:
        try:
            json.dumps(v.given(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"learn must be plain JSON values: {e}") from None
        return v

    @field_serializer("learn")
    def _learn_as_given(self, v: LearnConfig) -> dict[str, Any]:
        """Dumped as the fields the user set, as set: the digest, ``run.json`` and a config
        validated again from its dump stay what they were when ``learn`` was a plain table."""
        return v.given()

    @model_validator(mode="after")
    def _check_schedule(self) -> "ServerConfig":
        if not self.schedule:
            raise ValueError("schedule is empty: add at least one [[schedule]] entry")
        scouted = stats_seen = False
        for i, spec in enumerate(self.schedule):
            if spec.job == "scout":
                if spec.profiles is not None:
                    raise ValueError(f"schedule[{i}]: a scout round asks every profile (profiles = "
                                     f"{list(spec.profiles)}): the histogram grids and smoothing factors come from it")
                if stats_seen:
                    raise ValueError(f"schedule[{i}]: scout after a stats round would discard the "
                                     f"running statistics (their grids come from scouting)")
                if self.smoothing is not None and (scouted or spec.repeat > 1):
                    raise ValueError(f"schedule[{i}]: with smoothing, one scouting round: it fixes the "
                                     f"smoothing factors, and a second one would smooth the smoothed model")
                scouted = True
            elif spec.job == "stats":
                if not scouted:
                    raise ValueError(f"schedule[{i}]: stats before any scout round: the histogram "
                                     f"grids come from scouting")
                stats_seen = True
        return self

    @model_validator(mode="after")
    def _plan_round(self) -> "ServerConfig":
        """One plan round, after scouting and at least one statistics round (it lifts points from
        calibrated ranges, and the specs it picks are final: the points it leaves low keep the
        specs the run started with), and only with ``plans``; ``plans`` need one."""
        plans = [i for i, s in enumerate(self.schedule) if s.job == "plan"]
        if plans and not self.plans:
            raise ValueError(f"schedule[{plans[0]}]: a plan round needs plans = {{ <profile> = {{ avg_weight_bits "
                             "= ..., max_act16_share = ... }} }}: the budget of the profiles it plans")
        if self.plans and not plans:
            raise ValueError(f"plans for {sorted(self.plans)} but the schedule has no plan round")
        if len(plans) > 1 or any(self.schedule[i].repeat > 1 for i in plans):
            raise ValueError(f"schedule[{plans[-1]}]: one plan round per run (the specs it picks are final)")
        if plans:
            i = plans[0]
            if not any(s.job == "stats" for s in self.schedule[:i]):
                raise ValueError(f"schedule[{i}]: a plan round needs a statistics round before it (it "
                                 "measures the error of the calibrated ranges)")
        return self

    @model_validator(mode="after")
    def _hessian_rounds(self) -> "ServerConfig":
        """``gptq`` and hessian rounds come together, and only evaluation rounds after the hessian
        rounds: GPTQ rounds the weight points as the run leaves them (after the scouting round's
        factors, the plan's specs and the learned ranges), and a later round that moved a weight
        point would drop its codes."""
        hess = [i for i, s in enumerate(self.schedule) if s.job == "hessian"]
        if hess and not self.gptq:
            raise ValueError(f"schedule[{hess[0]}]: a hessian round needs gptq = {{ <profile> = {{ damp = 0.01 }} }}: "
                             "the profiles whose weights GPTQ rounds")
        if self.gptq and not hess:
            raise ValueError(f"gptq for {sorted(self.gptq)} but the schedule has no hessian round")
        later = [s.job for s in self.schedule[hess[0]:] if s.job not in ("hessian", "eval")] if hess else []
        if later:
            raise ValueError(f"schedule: a {later[0]} round after the first hessian round: only hessian and eval "
                             "rounds may follow it (GPTQ rounds the final weight points; a later round would move them)")
        return self

    @model_validator(mode="after")
    def _importance_needs_scouting(self) -> "ServerConfig":
        ranked = sorted(p for p, r in self.weight_ranges.items() if r == "importance")
        if ranked and not any(s.job == "scout" for s in self.schedule):
            raise ValueError(f"weight_ranges: {ranked} rank by importance, which the scouting round "
                             "collects: the schedule has none")
        if ranked and self.secure is not None and self.secure.scout:
            raise ValueError(f"weight_ranges: {ranked} rank by importance, which private scouting "
                             "(secure.scout) does not collect yet: set secure.scout = false")
        return self

    @model_validator(mode="after")
    def _secure_needs_sums(self) -> "ServerConfig":
        if self.secure is not None and self.stats_rule != "sum":
            raise ValueError(f"secure aggregation hides each client's statistics, so they cannot be merged by "
                             f"stats_rule = {self.stats_rule!r}: set stats_rule = 'sum' (each client's weight is "
                             f"then bounded by secure.cap instead)")
        return self

    @model_validator(mode="after")
    def _secure_scouting_resolves_the_power_sum(self) -> "ServerConfig":
        # private scouting (quant.private_scout) sums (a/B)^16 per channel: with fewer levels the
        # fixed point's rounding, not the clients, decides the smoothing factors
        if self.secure is not None and self.secure.scout and self.smoothing is not None and \
                self.secure.quantization_range < 1 << 24:
            raise ValueError(f"secure.quantization_range {self.secure.quantization_range}: with smoothing, the private "
                             f"scouting round's power sums need at least 2^24 levels (the default is 2^30)")
        return self

    @model_validator(mode="after")
    def _dp_replaces_the_merge(self) -> "ServerConfig":
        if self.dp is None:
            return self
        if self.stats_rule != "sum":
            raise ValueError(f"dp: the statistics rounds release a noisy mean of clipped ranges, not merged "
                             f"histograms, so stats_rule = {self.stats_rule!r} does not apply: set stats_rule = "
                             f"'sum' (the clip bounds each client instead)")
        return self

    def dp_clip(self, round: int) -> float:
        """The DP clip of statistics round ``round``: ``dp.clips`` in the order of the schedule's
        statistics rounds, the last one repeating."""
        if self.dp is None:
            raise ValueError("dp_clip of a config without dp")
        stats = [r for r, spec in self.rounds() if spec.job == "stats"]
        if round not in stats:
            raise ValueError(f"round {round} is not a statistics round")
        return float(self.dp.clips[min(stats.index(round), len(self.dp.clips) - 1)])

    @model_validator(mode="after")
    def _smoothing_needs_scouting(self) -> "ServerConfig":
        if self.smoothing is not None and not any(s.job == "scout" for s in self.schedule):
            raise ValueError("smoothing is set but the schedule has no scout round: the factors come "
                             "from the scouting round's per-channel abs-max")
        return self

    def calibrator_for(self, profile: str) -> CalibratorConfig:
        return self.profile_calibrators.get(profile, self.calibrator)

    @property
    def needs_weights(self) -> bool:
        """Whether the server needs the Linears' float weights: SmoothQuant factors, plans, weight
        ranges by importance and GPTQ all derive weight points from them (``server.strategy.FedQuant``
        refuses to start without them; a hessian round would otherwise ask no client for anything)."""
        return bool(self.smoothing or self.plans or self.weight_ranges or self.gptq)

    def rounds(self) -> list[tuple[int, RoundSpec]]:
        """The schedule unrolled: ``(round, spec)`` with rounds numbered from 1."""
        specs = [spec for spec in self.schedule for _ in range(spec.repeat)]
        return [(i + 1, spec) for i, spec in enumerate(specs)]

    def learn_json(self) -> str:
        """What lsq clients receive as ``learn``: only the fields the user set (a client fills in
        the rest, ``batch_size`` from the message's ``batch-size``), as set."""
        return json.dumps(self.learn.given(), sort_keys=True)

    def digest(self) -> str:
        """sha256 (16 hex digits) of everything that changes what a run computes (not the waiting
        knobs): a checkpoint refuses to resume under another."""
        data = self.model_dump(mode="json", exclude=set(OPERATIONAL))
        for spec in data["schedule"]:   # added later: a schedule without it keeps its digest (and its runs)
            if not spec["by_profile"]:
                del spec["by_profile"]
            if spec["profiles"] is None:
                del spec["profiles"]
        # the rules added later: a config naming the rules the code had before them keeps its digest
        if data["stats_rule"] == "sum" and data["lsq_rule"] == "mean":      # round_factor bounds neither
            del data["round_factor"]
        if data["stats_rule"] == "sum":
            del data["stats_rule"]
        if data["absmax_rule"] == "max":
            del data["absmax_rule"], data["absmax_clip"]
        if data["dp"] is None:
            del data["dp"]
        if not data["plans"]:
            del data["plans"]
        if not data["weight_ranges"]:
            del data["weight_ranges"]
        if not data["gptq"]:
            del data["gptq"]
        if data["secure"] is None:
            del data["secure"]
        else:
            data["secure"].pop("timeout_s", None)       # how long to wait changes nothing computed
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def sample_size(n_roster: int, fraction: float, min_clients: int) -> int:
    """``max(ceil(fraction * n), min_clients)`` (the ceil forgives float noise: 0.3 x 10 is 3)."""
    return max(math.ceil(fraction * n_roster - 1e-9), min_clients)

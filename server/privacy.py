"""Privacy accounting of the DP statistics rounds (docs/privacy.md, "Differential privacy").

Flower 1.42's ``RdpAccountant`` (Renyi DP, Mironov 2017, over Google's ``dp-accounting``) with
clients *sampled without replacement* in each round and the *replace-one* relation (Wang, Balle,
Kasiviswanathan, "Subsampled Renyi Differential Privacy and Analytical Moments Accountant",
AISTATS 2019): how the server samples a fixed number of clients per round, and the sensitivity
``quant.dp`` clips to. A release is one round's noisy sum for one set of clients.
"""

from __future__ import annotations

import math
from typing import Sequence

from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from quant.dp import noise_share_std


def _accountant(population: int, delta: float) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                       sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))


def epsilon(noise_multiplier: float, releases: Sequence[int], population: int, delta: float) -> float:
    """Epsilon at ``delta`` after one Gaussian release per entry of ``releases`` (each the number
    of clients sampled, without replacement, from ``population``), all at ``noise_multiplier``."""
    if not releases:
        return 0.0
    acc = _accountant(population, delta)
    for sample in releases:
        acc.compose(GaussianPrivacyEvent(float(noise_multiplier), int(sample), int(population)))
    return acc.get_epsilon(delta)


def noise_multiplier_for(target_epsilon: float, releases: Sequence[int], population: int, delta: float,
                         tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) whose releases spend at most
    ``target_epsilon`` at ``delta``: bisection, epsilon falls as the noise grows."""
    if not target_epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {target_epsilon}")
    lo, hi = 1e-2, 1.0
    while epsilon(hi, releases, population, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} needs a noise multiplier above 1e4")
    while hi / lo > 1 + tolerance:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if epsilon(mid, releases, population, delta) > target_epsilon else (lo, mid)
    return hi


def secure_noise_share(config, round: int, clients: int) -> tuple[float, int]:
    """Each client's noise share in a DP statistics round under SecAgg+, and the fewest vectors
    whose shares add up to the mechanism's noise: ``t = ceil(reconstruction_threshold x clients)``
    (fewer survivors cannot unmask the sum anyway; the server refuses a sum of fewer than ``t``).
    When all ``clients`` send one, the noise is ``sqrt(clients / t)`` times what the epsilon needs:
    the price of tolerating dropouts."""
    t = max(1, math.ceil(config.secure.reconstruction_threshold * clients - 1e-9))
    return noise_share_std(config.dp.noise_multiplier(), config.dp_clip(round), t), t


def run_privacy(config, metrics: Sequence[dict]) -> dict:
    """What a run's statistics rounds spent and how its scouting and statistics rounds were sent
    (summary.json's ``privacy``), from its config
    (``ServerConfig``) and metrics lines. Each client is in at most one statistics round (a round
    samples clients no earlier one used), so every client's data is in at most one Gaussian
    release: the run spends the epsilon of one, whatever the number of rounds (parallel
    composition; no amplification by sampling is claimed)."""
    statistics = "secure aggregation (SecAgg+)" if config.secure is not None else "in the clear"
    private = config.secure is not None and config.secure.scout
    scouting = ("secure aggregation (SecAgg+): log2 abs-max histograms per point and a power mean per channel "
                "(quant.private_scout), not noised" if private else "in the clear")
    if config.dp is None:
        return {"dp": None, "statistics": statistics, "scouting": scouting}
    released = [m["round"] for m in metrics if m.get("job") == "stats" and m.get("dp")]
    z = config.dp.noise_multiplier()
    return {"dp": {"epsilon": epsilon(z, [1], 1, config.dp.delta) if released else 0.0,
                   "delta": config.dp.delta, "target_epsilon": config.dp.epsilon, "noise_multiplier": z,
                   "clips_octaves": list(config.dp.clips), "released_in_rounds": released,
                   "accountant": "Renyi DP (Flower RdpAccountant over dp-accounting), replace-one, one Gaussian "
                                 "release per client",
                   "covers": "the statistics rounds (each client's calibrated ranges)",
                   "not_covered": ["scouting: log2 abs-max histograms and per-channel power sums, summed by "
                                   "SecAgg+, not noised" if private else
                                   "scouting: per-point min/max and per-channel abs-max, in the clear",
                                   "learned-range deltas", "evaluation metrics",
                                   *(["the plan round's sensitivity sums (in the clear)"] if config.plans else [])]},
            "statistics": ("clipped ranges; the clients add the noise in shares, SecAgg+ sums them: the server sees "
                           "the noisy sum only" if config.secure is not None else
                           "clipped ranges; the server sees each client's and adds the noise"),
            "scouting": scouting}

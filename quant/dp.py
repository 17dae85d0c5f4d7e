"""Differentially private ranges: what a statistics round can release under DP (docs/privacy.md).

A histogram of 514 cells per point cannot be released with useful noise: the 99.999th percentile
int8 calibrates on reads a tail mass of 1e-5 of the total, far below any per-cell noise a small
epsilon allows (docs/privacy.md). So under DP a client does not send histograms: it calibrates
its *own* range ``[lo_i, hi_i]`` per point (the profile's calibrator on its own statistics, on
the device) and sends, per point, where it lies relative to the current release ``[lo_c, hi_c]``
(public: it is the release the round started from):

    (log2 w_i - log2 w_c,  f_i - f_c)      w = hi - lo (the width),  f = -lo / w (where zero sits)

over all points, clipped to ``||v||_2 <= C``. Width in octaves because ranges span orders of
magnitude between points and clients; zero's place is a fraction in [0, 1] (0 for a non-negative
point), so a one-sided range is no special case and nothing takes the log of 0. Clipping in L2
bounds what one client can move: replacing one client's data moves the sum by at most ``2 C``,
so Gaussian noise of standard deviation ``z 2 C`` on the sum is the Gaussian mechanism with noise
multiplier ``z`` under the replace-one relation (Mironov, "Renyi Differential Privacy", 2017;
the accountant is ``server/privacy.py``). The release is the current range moved by the noisy
mean: ``w = w_c 2^(mean)`` (a geometric mean of the clients' widths), ``f = f_c + mean`` clamped
to [0, 1]. Rounds chain: the next round's centre is this release, so its clients' vectors are
short and clip little (DP-FedAvg's iterate, McMahan et al., ICLR 2018, with ranges for weights).

Dimension is what DP pays for (noise per coordinate grows with ``C``, and ``C`` with
``sqrt(coordinates)``): two numbers per point here, against 514 cells per point for histograms.

Pure numpy: who adds the noise (the server, or each client its share under secure aggregation)
is the caller's choice; ``noise_share_std`` gives a client's share.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# A point whose centre is narrower than this is not estimated (it stays where the centre has it).
TINY = 1e-12
# A client's width is clamped to [centre 2^-SPAN, centre 2^SPAN] before the logarithm: a point a
# client saw only zeros at would otherwise give -inf. (Such a point still takes most of the
# client's clip, shrinking the rest of its vector: a dead point is rare in a language model.)
SPAN = 8.0


def coordinates(ranges: Mapping[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Width ``hi - lo`` and zero's place ``-lo / width`` of every key's range widened to contain
    0 (as ``range_to_qparams`` does), in sorted key order; a width of 0 has place 0."""
    lo = np.array([min(float(ranges[k][0]), 0.0) for k in sorted(ranges)], dtype=np.float64)
    hi = np.array([max(float(ranges[k][1]), 0.0) for k in sorted(ranges)], dtype=np.float64)
    width = hi - lo
    place = np.divide(-lo, width, out=np.zeros_like(width), where=width > 0)
    return width, place


def client_vector(ranges: Mapping[str, tuple[float, float]], centres: Mapping[str, tuple[float, float]],
                  clip: float) -> np.ndarray:
    """One client's contribution: per key of ``centres`` (sorted), ``log2`` of its range's width
    over the centre's and its zero's place minus the centre's, interleaved, clipped to L2 norm
    ``clip``. A key the client has no range for, and a key whose centre has no width,
    contributes 0 (so every client's vector has the same layout)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    missing = sorted(set(ranges) - set(centres))
    if missing:
        raise ValueError(f"ranges for keys the centres do not have: {missing[:3]}")
    cw, cf = coordinates(centres)
    held = np.array([k in ranges for k in sorted(centres)])
    w, f = coordinates({k: ranges.get(k, centres[k]) for k in centres})
    live = (cw > TINY) & held
    v = np.zeros((len(cw), 2))
    v[live, 0] = np.clip(np.log2(np.maximum(w[live], TINY)) - np.log2(cw[live]), -SPAN, SPAN)
    v[live, 1] = f[live] - cf[live]
    return clip_l2(v.reshape(-1), clip)


def clip_l2(v: np.ndarray, clip: float) -> np.ndarray:
    """``v`` scaled down to L2 norm ``clip`` if it is longer (the direction is kept)."""
    norm = float(np.linalg.norm(v))
    return v if norm <= clip else v * (clip / norm)


def noise_std(noise_multiplier: float, clip: float) -> float:
    """Standard deviation of the Gaussian noise on the sum: ``z`` times the replace-one L2
    sensitivity ``2 clip``."""
    return float(noise_multiplier) * 2.0 * float(clip)


def noise_share_std(noise_multiplier: float, clip: float, min_clients: int) -> float:
    """Each client's share when the clients add the noise (under secure aggregation, so the server
    never sees a sum without it): ``std / sqrt(min_clients)``, so any ``min_clients`` shares add up
    to the full noise; more clients add more noise, never less."""
    if min_clients < 1:
        raise ValueError(f"min_clients must be >= 1, got {min_clients}")
    return noise_std(noise_multiplier, clip) / float(np.sqrt(min_clients))


def noisy_sum(vectors: Sequence[np.ndarray], std: float, rng: np.random.Generator) -> np.ndarray:
    """The sum of the clients' (clipped) vectors plus N(0, std^2) per coordinate: the central form
    (the server adds the noise, or it is the sum of the clients' shares)."""
    if not vectors:
        raise ValueError("no client vectors to sum")
    total = np.sum(np.stack(vectors), axis=0)
    return total + rng.normal(0.0, std, size=total.shape) if std > 0 else total


def release(total: np.ndarray, clients, centres: Mapping[str, tuple[float, float]]
            ) -> dict[str, tuple[float, float]]:
    """The released range per key: the centre's width times ``2^(mean)`` and its zero's place plus
    the mean (clamped to [0, 1]), the means being ``total / clients``. ``clients``: how many
    vectors were summed, one number or one per key of ``centres`` (sorted; the clients that could
    report the key: which points a client holds follows from its profile, which the server knows,
    as it knows who replied). A key nobody reported, or whose centre has no width, stays at the
    centre."""
    cw, cf = coordinates(centres)
    k = np.broadcast_to(np.asarray(clients, dtype=np.float64), (len(centres),))
    if np.any(k < 0) or not np.all(np.isfinite(k)):
        raise ValueError(f"clients must be >= 0, got {clients}")
    if not np.any(k >= 1):
        raise ValueError("clients must be >= 1 for some key")
    if total.shape != (2 * len(cw),):
        raise ValueError(f"sum has {total.size} numbers, the centres need {2 * len(cw)}")
    if not np.all(np.isfinite(total)):
        raise ValueError("sum has non-finite numbers")
    t = total.reshape(-1, 2)
    use = (k >= 1) & (cw > TINY)
    mean = np.zeros_like(t)
    mean[use] = t[use] / k[use, None]
    width = cw * np.exp2(np.clip(mean[:, 0], -SPAN, SPAN))
    place = np.clip(cf + mean[:, 1], 0.0, 1.0)
    lo, hi = -place * width, (1.0 - place) * width
    keys = sorted(centres)
    return {key: (float(lo[i]), float(hi[i])) if use[i] else (float(centres[key][0]), float(centres[key][1]))
            for i, key in enumerate(keys)}


# ---------------------------------------------------------------------------------------------
# Under secure aggregation: each client adds its noise share, the server sees only the noisy sum

SHARE_TAIL = 8.0     # a share is clamped at SHARE_TAIL standard deviations (P ~ 1e-15 per number)


def secure_bound(clip: float, share_std: float) -> float:
    """The bound ``B`` every number of a noised vector is divided by to fit SecAgg+'s [-1, 1]: a
    clipped coordinate is at most ``clip``, a share rarely past ``SHARE_TAIL`` deviations."""
    return float(clip) + SHARE_TAIL * float(share_std)


def noised_secure_vector(vector: np.ndarray, share_std: float, clip: float,
                         rng: np.random.Generator) -> np.ndarray:
    """A client's clipped vector plus its Gaussian noise share, divided by ``secure_bound`` and
    clamped to [-1, 1] (only a share beyond ``SHARE_TAIL`` deviations is touched)."""
    bound = secure_bound(clip, share_std)
    noisy = np.asarray(vector, dtype=np.float64) + rng.normal(0.0, share_std, size=np.shape(vector))
    return np.clip(noisy / bound, -1.0, 1.0)

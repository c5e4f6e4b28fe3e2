"""Client-level DP: the clip bound both sides agree on and the participants' noise (the coordinator accounts).

Participants clip to ``C_dp`` and each adds N(0, (z C_dp)^2 / n) per coordinate, so the sum of the
n updates carries N(0, (z C_dp)^2) (distributed noise: no single party knows the total). HE-Adam
needs every coordinate of the averaged update bounded by C (``coordinator/he_adam.py``); the
average's noise has std z C_dp / n, so ``C_dp = C / (1 + 8 z / n)`` leaves an 8-sigma margin
(a coordinate leaves the fitted interval with probability ~1e-15).
"""

from __future__ import annotations

import numpy as np

from protos.update_units import clip_l2

DP_SIGMA_MARGIN = 8.0


def dp_clip_bound(clip: float, z: float, n: int) -> float:
    """C_dp: the L2 bound participants clip to before adding their share of the noise."""
    if z <= 0:
        return clip
    return clip / (1.0 + DP_SIGMA_MARGIN * z / max(n, 1))


def dp_clip_and_noise(update: np.ndarray, clip: float, z: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to C_dp and add this participant's share of the noise, std z*C_dp/sqrt(n).

    The n shares sum to std z*C_dp. ``rng`` is the participant's own randomness (OS entropy unless its
    node policy opts into a private seed; never the public run seed): nobody knows the total noise.
    """
    bound = dp_clip_bound(clip, z, n)
    return clip_l2(update, bound) + rng.normal(0.0, z * bound / np.sqrt(n), update.size)

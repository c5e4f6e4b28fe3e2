"""Client-level DP constants both sides agree on (participants add noise, the coordinator accounts).

Participants clip to ``C_dp`` and each adds N(0, (z C_dp)^2 / n) per coordinate, so the sum of the
n updates carries N(0, (z C_dp)^2) (distributed noise: no single party knows the total). HE-Adam
needs every coordinate of the averaged update bounded by C (``coordinator/he_adam.py``); the
average's noise has std z C_dp / n, so ``C_dp = C / (1 + 8 z / n)`` leaves an 8-sigma margin
(a coordinate leaves the fitted interval with probability ~1e-15).
"""

from __future__ import annotations

DP_SIGMA_MARGIN = 8.0


def dp_clip_bound(clip: float, z: float, n: int) -> float:
    """C_dp: the L2 bound participants clip to before adding their share of the noise."""
    if z <= 0:
        return clip
    return clip / (1.0 + DP_SIGMA_MARGIN * z / max(n, 1))

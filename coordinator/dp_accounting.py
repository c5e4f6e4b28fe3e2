"""Client-level DP accounting for the federation (participants add the noise, see protos/dp.py).

Every participant takes part in every round (no sampling amplification, q = 1) and the sum of the
updates carries Gaussian noise of std z * C_dp for sensitivity C_dp (add/remove one participant's
whole contribution), so each round is a Gaussian mechanism with noise multiplier z. When only m of
the n participants answer, the sum carries only m shares of the noise: the round is accounted
with z_eff = z * sqrt(m / n). Epsilon for delta comes from the RDP accountant of Google's
dp-accounting (the library Flower's ``RdpAccountant`` wraps).

Not covered: the released (rounded) federation mean return, CKKS approximation error (not DP
noise), and malicious participants who skip their noise share (each one that does lowers the
real noise below what is accounted).
"""

from __future__ import annotations

import math


def rdp_epsilon(noise_multipliers: list[float], delta: float, sampling_rate: float = 1.0) -> float:
    """Epsilon after composing one (optionally Poisson-subsampled) Gaussian mechanism per entry."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    import dp_accounting  # 1 s of scipy imports: only runs with DP pay them
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    counts: dict[float, int] = {}
    for z in noise_multipliers:
        counts[z] = counts.get(z, 0) + 1
    for z, count in counts.items():
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if sampling_rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def effective_noise_multiplier(z: float, answered: int, sampled: int) -> float:
    return z * math.sqrt(answered / sampled) if sampled else 0.0


class DPAccountant:
    """Observer of completed rounds: each round's effective noise multiplier and the epsilon so far."""

    def __init__(self, settings) -> None:
        self.z, self.delta = settings.dp_noise_multiplier, settings.dp_delta
        self.history: list[float] = []  # effective noise multiplier per completed round

    def resume(self, rows: list[dict]) -> None:
        self.history = [row["dp_z"] for row in rows if row.get("dp_z")]

    def completed(self, answered: int, sampled: int) -> dict:
        """The round's metrics fields."""
        self.history.append(effective_noise_multiplier(self.z, answered, sampled))
        return {"dp_z": round(self.history[-1], 6), "dp_epsilon": round(rdp_epsilon(self.history, self.delta), 4)}

    def summary(self) -> dict:
        return {"dp_noise_multiplier": self.z, "dp_delta": self.delta, "dp_rounds": len(self.history),
                "dp_epsilon": round(rdp_epsilon(self.history, self.delta), 4)}

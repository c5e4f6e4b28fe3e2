"""HE-Adam's public configuration: both sides need it (participants pre-scale their updates).

See ``coordinator/he_adam.py`` for the algorithm and the bound behind ``tau``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev

from protos.profiles import HEProfile

# Additive refresh masks are uniform in [-MASK_BOUND, MASK_BOUND]: large against the state
# (|m~| <= sqrt(B-1), w~ <= 1) yet far below the 2^19 headroom of a fully consumed ciphertext.
MASK_BOUND = 2.0**15
# The encrypted optimizer state next to theta: m~ (stored as "m"), z = (v + tau) / tau and w~
# (stored as "w"); docs/he-adam.md, "Normalized state".
STATE_NAMES = ("m", "z", "w")
SERVER_OPTIMIZERS = ("adam", "sgd")


class HEAdamConfigError(ValueError):
    """An HE-Adam configuration that cannot keep its guarantees."""


@dataclass(frozen=True, kw_only=True)
class HEAdamConfig:
    """Public hyperparameters of HE-Adam; ``tau`` defaults to the value the bound needs. A run's comes
    from its scenario (``HEAdamConfig.of(scenario.server_optimizer(mode))``, once, in the run plan)."""

    lr: float = 0.01
    # adam: HE-Adam. sgd: HE-SGD with momentum, m = b1 m + (1 - b1) G, theta -= lr m: no second moment
    # and no polynomial, the linear baseline (z and w~ are kept but never change).
    optimizer: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.99
    clip_bound: float  # C: |G_j| <= C for every coordinate of the aggregate (no default: the scenario's)
    interval_upper: float = 4.0  # B
    degree: int = 7
    tau: float | None = None
    margin_low: float = 0.02  # fit P on [b2 - margin_low, B + margin_high]: CKKS noise, w error
    margin_high: float = 0.1
    max_poly_error: float = 1e-3

    @property
    def tau_value(self) -> float:
        if self.tau is not None:
            return self.tau
        return (1 - self.beta2) * self.clip_bound**2 / (self.interval_upper - 1)

    @property
    def update_scale(self) -> float:
        """s: participants multiply their (clipped, weighted) update by this before encrypting."""
        return math.sqrt((1 - self.beta2) / self.tau_value)

    @property
    def step_gain(self) -> float:
        """K = lr / sqrt(1 - b2)."""
        return self.lr / math.sqrt(1 - self.beta2)

    @property
    def x_bound(self) -> float:
        """Largest x the clipping bound allows: 1 + (1-b2) C^2 / tau."""
        return 1 + (1 - self.beta2) * self.clip_bound**2 / self.tau_value

    @property
    def fit_interval(self) -> tuple[float, float]:
        return (self.beta2 - self.margin_low, self.interval_upper + self.margin_high)

    @property
    def depth(self) -> int:
        return 3 + int(math.log2(self.degree + 1))

    @classmethod
    def of(cls, server: Any, optimizer: str = "adam") -> HEAdamConfig:
        """From a scenario's ``ServerOptimizer`` (``Scenario.server_optimizer(mode)``) and the run's choice."""
        if optimizer not in SERVER_OPTIMIZERS:
            raise HEAdamConfigError(f"unknown server optimizer {optimizer!r}; known: {', '.join(SERVER_OPTIMIZERS)}")
        return cls(lr=server.sgd_lr if optimizer == "sgd" else server.lr, optimizer=optimizer, beta1=server.beta1,
                   beta2=server.beta2, clip_bound=server.clip_bound, interval_upper=server.interval_upper)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HEAdamConfig:
        return cls(**json.loads(text))

    def validate(self, profile: HEProfile | None = None) -> InverseSqrtPolynomial:
        """Refuse settings that break the interval guarantee; return the fitted polynomial."""
        if self.optimizer not in SERVER_OPTIMIZERS:
            raise HEAdamConfigError(f"optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 < self.beta2 < 1):
            raise HEAdamConfigError("need lr > 0, 0 <= beta1 < 1 and 0 < beta2 < 1")
        if self.clip_bound <= 0 or self.interval_upper <= 1:
            raise HEAdamConfigError("need clip_bound C > 0 and interval_upper B > 1")
        if self.degree not in (3, 7, 15):
            raise HEAdamConfigError(f"degree must be 3, 7 or 15 (2^k - 1), got {self.degree}")
        if self.tau_value <= 0:
            raise HEAdamConfigError("tau must be positive")
        if self.x_bound > self.interval_upper * (1 + 1e-12):
            need = (1 - self.beta2) * self.clip_bound**2 / (self.interval_upper - 1)
            raise HEAdamConfigError(
                f"tau={self.tau_value:.3g} cannot keep x inside the fitted interval: with "
                f"C={self.clip_bound} x can reach {self.x_bound:.3g} > B={self.interval_upper}. "
                f"Use tau >= (1-beta2) C^2/(B-1) = {need:.3g} (the default), or raise B."
            )
        if self.fit_interval[0] <= 0:
            raise HEAdamConfigError("beta2 - margin_low must be positive")
        if profile is not None:
            if self.depth > profile.levels:
                raise HEAdamConfigError(
                    f"degree {self.degree} needs {self.depth} levels, profile {profile.name} has "
                    f"{profile.levels}; lower the degree (and B) or pick a deeper profile"
                )
            z_max = 1 + (self.x_bound - 1) / (1 - self.beta2)
            if z_max + MASK_BOUND >= 2.0 ** (profile.headroom_bits - 1):
                raise HEAdamConfigError(
                    f"z state can reach {z_max:.3g}, beyond profile {profile.name}'s headroom"
                )
        poly = InverseSqrtPolynomial.fit(self.fit_interval, self.degree)
        if poly.max_rel_error > self.max_poly_error:
            raise HEAdamConfigError(
                f"degree-{self.degree} fit of x^-1/2 on [{self.fit_interval[0]:.3g}, "
                f"{self.fit_interval[1]:.3g}] has relative error {poly.max_rel_error:.2g} > "
                f"{self.max_poly_error:g}; raise the degree or lower B"
            )
        return poly


@dataclass(frozen=True)
class InverseSqrtPolynomial:
    """P(x) ~ x^(-1/2) as monomial coefficients in s = x - center (no level for the shift)."""

    center: float
    coefficients: tuple[float, ...]
    interval: tuple[float, float]
    max_rel_error: float

    @classmethod
    def fit(cls, interval: tuple[float, float], degree: int) -> InverseSqrtPolynomial:
        lo, hi = interval
        center, half = (lo + hi) / 2, (hi - lo) / 2
        nodes = np.cos(np.pi * (np.arange(400) + 0.5) / 400)
        xs = center + half * nodes
        # Weighted Chebyshev least squares on Chebyshev nodes ~ minimax in relative error.
        cheb = chebyshev.chebfit(nodes, xs**-0.5, degree, w=xs**0.5)
        in_y = chebyshev.cheb2poly(cheb)  # monomials in y = s / half
        coeffs = tuple(float(c / half**k) for k, c in enumerate(in_y))
        grid = np.linspace(lo, hi, 20001)
        approx = np.polynomial.polynomial.polyval(grid - center, coeffs)
        err = float(np.max(np.abs(approx * np.sqrt(grid) - 1)))
        return cls(center, coeffs, (lo, hi), err)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(np.asarray(x) - self.center, self.coefficients)

"""HE-Adam: Adam on CKKS ciphertexts with a reparameterized inverse square root.

Plain Adam (no bias correction), per coordinate, on the aggregate G with |G| <= C::

    m_t = b1 m + (1-b1) G          v_t = b2 v + (1-b2) G^2
    theta_t = theta - lr * m_t * (v_t + tau)^(-1/2)

Instead of a deep polynomial for (v+tau)^(-1/2), keep w ~ (v+tau)^(-1/2) and update it
multiplicatively, ``w_t = w_{t-1} * P(x_t)`` with ``x_t = (v_t+tau) w_{t-1}^2`` and P ~ x^(-1/2)
on a narrow interval (design/he-adam.md). All state is kept normalized so values stay O(1) and
no scalar multiply is wasted:

* participants send ``u = s * G`` with ``s = sqrt((1-b2)/tau)`` (folded into their pre-weighting),
* ``m~ = s*m``, ``z = (v+tau)/tau`` (>= 1) and ``w~ = sqrt(tau)*w = z^(-1/2)`` (in (0, 1]),
* so ``z_t = b2 z + (1-b2) + u^2``, ``x_t = z_t w~^2`` and
  ``theta_t = theta - K m~_t w~_t`` with ``K = lr / sqrt(1-b2)``.

The bound: |G| <= C gives ``b2 < x_t <= 1 + (1-b2) C^2 / tau``; with the default
``tau = (1-b2) C^2 / (B-1)`` x never leaves [b2, B], for every coordinate and round, with no
comparison on ciphertexts. The step uses ``3 + log2(degree+1)`` levels (6 for degree 7):
u^2, w~^2 -> x -> P(x) (depth 3) -> w~ P and (K m~ w~) P. The state comes back low-level and
is refreshed by a key holder (``mask_state``/``unmask_state``, threat-model.md step 5).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.polynomial import chebyshev

from protos.backend import Chunk, HEBackend
from protos.codec import EncryptedVector, encrypt_vector, pad_to_chunks
from protos.profiles import HEProfile

STATE_NAMES = ("m", "v", "w")
# Additive refresh masks are uniform in [-MASK_BOUND, MASK_BOUND]: large against the state
# (|m~| <= sqrt(B-1), w~ <= 1) yet far below the 2^19 headroom of a fully consumed ciphertext.
MASK_BOUND = 2.0**15


class HEAdamConfigError(ValueError):
    """An HE-Adam configuration that cannot keep its guarantees."""


@dataclass(frozen=True)
class HEAdamConfig:
    """Public hyperparameters of HE-Adam; ``tau`` defaults to the value the bound needs."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    clip_bound: float = 1.0  # C: |G_j| <= C for every coordinate of the aggregate
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HEAdamConfig":
        return cls(**json.loads(text))

    def validate(self, profile: HEProfile | None = None) -> "InverseSqrtPolynomial":
        """Refuse settings that break the interval guarantee; return the fitted polynomial."""
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
                    f"v state can reach {z_max:.3g}, beyond profile {profile.name}'s headroom"
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
    def fit(cls, interval: tuple[float, float], degree: int) -> "InverseSqrtPolynomial":
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


def evaluate_polynomial(backend: HEBackend, s: Chunk, coeffs: tuple[float, ...]) -> Chunk:
    """Evaluate sum c_k s^k at multiplicative depth log2(len(coeffs)).

    Split P = L + s^(2^j) H recursively; the leaves c0 + c1 s cost one scalar multiply, so
    coefficients never need a level of their own.
    """
    k = int(math.log2(len(coeffs)))
    if 2**k != len(coeffs):
        raise ValueError("number of coefficients must be a power of two")
    powers = [s]
    for _ in range(k - 1):
        powers.append(backend.mul(powers[-1], powers[-1]))

    def rec(cs: tuple[float, ...], j: int) -> Chunk:
        if len(cs) == 2:
            return backend.add_scalar(backend.mul_scalar(s, cs[1]), cs[0])
        half = len(cs) // 2
        low, high = rec(cs[:half], j - 1), rec(cs[half:], j - 1)
        return backend.add(low, backend.mul(high, powers[j - 1]))

    return rec(tuple(coeffs), k)


@dataclass
class HEAdamState:
    """Everything the coordinator keeps between rounds: all of it ciphertext."""

    theta: EncryptedVector
    m: EncryptedVector
    v: EncryptedVector
    w: EncryptedVector
    step: int = 0

    def named(self) -> dict[str, EncryptedVector]:
        return {"m": self.m, "v": self.v, "w": self.w}


def initial_optimizer_state(backend: HEBackend, length: int) -> dict[str, EncryptedVector]:
    """m~ = 0, z = 1, w~ = 1 (v = 0): public values, encrypted with the public key."""
    return {
        "m": encrypt_vector(backend, np.zeros(length)),
        "v": encrypt_vector(backend, np.ones(length)),
        "w": encrypt_vector(backend, np.ones(length)),
    }


@dataclass
class StepResult:
    state: HEAdamState
    x: EncryptedVector  # the polynomial's input, kept for interval checks by key holders


def he_adam_step(
    backend: HEBackend,
    state: HEAdamState,
    aggregate: EncryptedVector,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> StepResult:
    """One HE-Adam step on the summed, pre-scaled updates ``aggregate`` (= s * G)."""
    b1, b2, gain = config.beta1, config.beta2, config.step_gain

    def step(theta: Chunk, m: Chunk, z: Chunk, w: Chunk, u: Chunk) -> tuple[Chunk, ...]:
        m_new = backend.add(backend.mul_scalar(m, b1), backend.mul_scalar(u, 1 - b1))
        km = backend.add(backend.mul_scalar(m, gain * b1), backend.mul_scalar(u, gain * (1 - b1)))
        z_new = backend.add_scalar(backend.add(backend.mul_scalar(z, b2), backend.mul(u, u)), 1 - b2)
        x = backend.mul(z_new, backend.mul(w, w))
        p = evaluate_polynomial(backend, backend.add_scalar(x, -poly.center), poly.coefficients)
        w_new = backend.mul(w, p)
        theta_new = backend.sub(theta, backend.mul(backend.mul(km, w), p))
        return theta_new, m_new, z_new, w_new, x

    parts = [
        step(*chunks)
        for chunks in zip(
            state.theta.chunks, state.m.chunks, state.v.chunks, state.w.chunks, aggregate.chunks
        )
    ]
    n = aggregate.length
    theta, m, v, w, x = (EncryptedVector([p[i] for p in parts], n) for i in range(5))
    return StepResult(HEAdamState(theta, m, v, w, state.step + 1), x)


@dataclass
class Masks:
    """The coordinator's secret additive masks for one refresh."""

    values: dict[str, np.ndarray] = field(default_factory=dict)


def mask_state(
    backend: HEBackend, state: dict[str, EncryptedVector], rng: np.random.Generator
) -> tuple[dict[str, EncryptedVector], Masks]:
    """Add fresh uniform masks so the refresher sees only masked values."""
    masked, masks = {}, Masks()
    for name, vec in state.items():
        mask = rng.uniform(-MASK_BOUND, MASK_BOUND, size=vec.length)
        masks.values[name] = mask
        masked[name] = _add_plain(backend, vec, mask)
    return masked, masks


def unmask_state(
    backend: HEBackend, refreshed: dict[str, EncryptedVector], masks: Masks
) -> dict[str, EncryptedVector]:
    """Remove the masks from the refresher's fresh, full-depth ciphertexts."""
    if set(refreshed) != set(masks.values):
        raise ValueError(f"refresh returned {sorted(refreshed)}, expected {sorted(masks.values)}")
    return {name: _add_plain(backend, vec, -masks.values[name]) for name, vec in refreshed.items()}


def _add_plain(backend: HEBackend, vec: EncryptedVector, values: np.ndarray) -> EncryptedVector:
    slots = backend.slots
    padded = pad_to_chunks(values, slots)
    return EncryptedVector(
        [backend.add_plain(c, padded[i * slots : (i + 1) * slots]) for i, c in enumerate(vec.chunks)],
        vec.length,
    )


def reference_adam(
    theta0: np.ndarray, grads: list[np.ndarray], config: HEAdamConfig
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The same Adam in NumPy (no bias correction): final theta, and w_t, v_t per step."""
    theta, m, v = theta0.astype(np.float64).copy(), np.zeros_like(theta0), np.zeros_like(theta0)
    tau = config.tau_value
    ws, vs = [], []
    for g in grads:
        m = config.beta1 * m + (1 - config.beta1) * g
        v = config.beta2 * v + (1 - config.beta2) * g**2
        w = (v + tau) ** -0.5
        theta = theta - config.lr * m * w
        ws.append(w)
        vs.append(v)
    return theta, ws, vs


__all__ = [
    "HEAdamConfig",
    "HEAdamConfigError",
    "HEAdamState",
    "InverseSqrtPolynomial",
    "Masks",
    "STATE_NAMES",
    "evaluate_polynomial",
    "he_adam_step",
    "initial_optimizer_state",
    "mask_state",
    "reference_adam",
    "unmask_state",
]

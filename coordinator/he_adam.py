"""HE-Adam: Adam on CKKS ciphertexts with a reparameterized inverse square root.

Plain Adam (no bias correction), per coordinate, on the aggregate G with |G| <= C::

    m_t = b1 m + (1-b1) G          v_t = b2 v + (1-b2) G^2
    theta_t = theta - lr * m_t * (v_t + tau)^(-1/2)

Instead of a deep polynomial for (v+tau)^(-1/2), keep w ~ (v+tau)^(-1/2) and update it
multiplicatively, ``w_t = w_{t-1} * P(x_t)`` with ``x_t = (v_t+tau) w_{t-1}^2`` and P ~ x^(-1/2)
on a narrow interval (docs/he-adam.md). All state is kept normalized so values stay O(1) and
no scalar multiply is wasted:

* participants send ``u = s * G`` with ``s = sqrt((1-b2)/tau)`` (folded into their pre-weighting),
* ``m~ = s*m``, ``z = (v+tau)/tau`` (>= 1) and ``w~ = sqrt(tau)*w = z^(-1/2)`` (in (0, 1]),
* so ``z_t = b2 z + (1-b2) + u^2``, ``x_t = z_t w~^2`` and
  ``theta_t = theta - K m~_t w~_t`` with ``K = lr / sqrt(1-b2)``.

The bound: |G| <= C gives ``b2 < x_t <= 1 + (1-b2) C^2 / tau``; with the default
``tau = (1-b2) C^2 / (B-1)`` x never leaves [b2, B], for every coordinate and round, with no
comparison on ciphertexts. The step uses ``3 + log2(degree+1)`` levels (6 for degree 7):
u^2, w~^2 -> x -> P(x) (depth 3) -> w~ P and (K m~ w~) P. The state comes back low-level and
is refreshed by a key holder (``mask_state``/``unmask_state``, docs/threat-model.md, step 4).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from coordinator.secret_random import secret_uniform
from protos.backend import Chunk, HEBackend
from protos.codec import EncryptedVector, encrypt_vector, pad_to_chunks
from protos.optimizer import MASK_BOUND, STATE_NAMES, HEAdamConfig, HEAdamConfigError, InverseSqrtPolynomial


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
    return _split_evaluate(backend, tuple(coeffs), powers, k)


def _split_evaluate(backend: HEBackend, cs: tuple[float, ...], powers: list[Chunk], j: int) -> Chunk:
    """``L + s^(2^(j-1)) H`` for ``len(cs) == 2^j``. A module-level function, not a closure: a
    recursive closure is a reference cycle that keeps every ciphertext it saw alive until the
    cyclic garbage collector runs, which grew a 200-round run by gigabytes."""
    if len(cs) == 2:
        return backend.add_scalar(backend.mul_scalar(powers[0], cs[1]), cs[0])
    half = len(cs) // 2
    low, high = _split_evaluate(backend, cs[:half], powers, j - 1), _split_evaluate(backend, cs[half:], powers, j - 1)
    return backend.add(low, backend.mul(high, powers[j - 1]))


@dataclass
class HEAdamState:
    """Everything the coordinator keeps between rounds: all of it ciphertext."""

    theta: EncryptedVector
    m: EncryptedVector  # m~
    z: EncryptedVector  # z = (v + tau) / tau
    w: EncryptedVector  # w~
    step: int = 0

    def named(self) -> dict[str, EncryptedVector]:
        return {"m": self.m, "z": self.z, "w": self.w}


def initial_optimizer_state(backend: HEBackend, length: int) -> dict[str, EncryptedVector]:
    """m~ = 0, z = 1, w~ = 1 (v = 0): public values, encrypted with the public key."""
    return {
        "m": encrypt_vector(backend, np.zeros(length)),
        "z": encrypt_vector(backend, np.ones(length)),
        "w": encrypt_vector(backend, np.ones(length)),
    }


@dataclass
class StepResult:
    state: HEAdamState
    x: EncryptedVector | None  # the polynomial's input, for the benchmarks' interval check (in-process only)


def he_adam_step(
    backend: HEBackend,
    state: HEAdamState,
    aggregate: EncryptedVector,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> StepResult:
    """One HE-Adam step on the summed, pre-scaled updates ``aggregate`` (= s * G)."""
    parts = [
        step_chunk(backend, m, z, w, u, config, poly)
        for m, z, w, u in zip(state.m.chunks, state.z.chunks, state.w.chunks, aggregate.chunks)
    ]
    return assemble_step(backend, state, parts, aggregate.length)


def step_chunk(
    backend: HEBackend,
    m: Chunk,
    z: Chunk,
    w: Chunk,
    u: Chunk,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
    with_x: bool = True,
) -> tuple[Chunk, Chunk, Chunk, Chunk, Chunk | None]:
    """The step on one chunk: ``(delta, m~_t, z_t, w~_t, x)`` with ``theta_t = theta - delta``.

    theta itself is only needed for that last subtraction, so it never has to travel to a worker
    process (``coordinator.parallel_step``); nor does ``x`` (``with_x=False``), which only the
    benchmarks decrypt.
    """
    b1, b2 = config.beta1, config.beta2
    m_new = backend.add(backend.mul_scalar(m, b1), backend.mul_scalar(u, 1 - b1))
    if config.optimizer == "sgd":  # HE-SGD: theta -= lr m, with u = s G: two levels, z and w~ untouched
        return backend.mul_scalar(m_new, config.lr / config.update_scale), m_new, z, w, None
    km = backend.mul_scalar(m_new, config.step_gain)  # level 2; km * w (3) still meets P(x) (5) in time
    z_new = backend.add_scalar(backend.add(backend.mul_scalar(z, b2), backend.mul(u, u)), 1 - b2)
    x = backend.mul(z_new, backend.mul(w, w))
    p = evaluate_polynomial(backend, backend.add_scalar(x, -poly.center), poly.coefficients)
    w_new = backend.mul(w, p)
    delta = backend.mul(backend.mul(km, w), p)
    return delta, m_new, z_new, w_new, x if with_x else None


def assemble_step(backend: HEBackend, state: HEAdamState, parts: list[tuple], length: int) -> StepResult:
    """Subtract each chunk's ``delta`` from theta and gather the per-chunk results into vectors."""
    theta = EncryptedVector([backend.sub(t, p[0]) for t, p in zip(state.theta.chunks, parts)], length)
    m, z, w = (EncryptedVector([p[i] for p in parts], length) for i in range(1, 4))
    x = EncryptedVector([p[4] for p in parts], length) if parts[0][4] is not None else None
    return StepResult(HEAdamState(theta, m, z, w, state.step + 1), x)


class LevelCount:
    """Stands in for a backend in a dry run of the step: a chunk is the number of levels it used.

    Mirrors TenSEAL's CKKS arithmetic: a product (with a ciphertext or a scalar) is rescaled and
    uses one level beyond its deeper operand; a sum is as deep as its deeper operand.
    """

    def add(self, a: int, b: int) -> int:
        return max(a, b)

    def mul(self, a: int, b: int) -> int:
        return max(a, b) + 1

    def mul_scalar(self, a: int, c: float) -> int:
        return a + 1

    def add_scalar(self, a: int, c: float) -> int:
        return a


def step_levels(start: dict[str, int], aggregate_level: int, config: HEAdamConfig,
                poly: InverseSqrtPolynomial) -> tuple[dict[str, int], int]:
    """Levels each state vector has used after a step from ``start`` levels, and the deepest value's."""
    delta, m, z, w, x = step_chunk(LevelCount(), start["m"], start["z"], start["w"], aggregate_level, config, poly)
    return {"m": m, "z": z, "w": w}, max(level for level in (delta, m, z, w, x) if level is not None)


def refresh_due(
    levels_used: dict[str, int],
    aggregate_level: int,
    profile_levels: int,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> tuple[str, ...]:
    """The state vectors the next step needs fresh: the fewest re-encryptions that let it fit.

    ``levels_used``: each state vector's levels used now. At the default profile ``z`` and ``w~``
    need every level of the step, but ``m~`` only enters through ``K m~_t w~``, which waits for
    ``P(x)``: it can start two levels down, so it is re-encrypted every third round only.
    """
    for size in range(len(STATE_NAMES) + 1):
        for due in itertools.combinations(STATE_NAMES, size):
            start = {name: 0 if name in due else levels_used[name] for name in STATE_NAMES}
            if step_levels(start, aggregate_level, config, poly)[1] <= profile_levels:
                return due
    raise HEAdamConfigError(f"one HE-Adam step needs more than the profile's {profile_levels} levels")


@dataclass
class Masks:
    """The coordinator's secret additive masks for one refresh."""

    values: dict[str, np.ndarray] = field(default_factory=dict)


def mask_state(
    backend: HEBackend, state: dict[str, EncryptedVector]
) -> tuple[dict[str, EncryptedVector], Masks]:
    """Add fresh secret uniform masks (OS entropy) so the refresher sees only masked values."""
    masked, masks = {}, Masks()
    for name, vec in state.items():
        mask = secret_uniform(-MASK_BOUND, MASK_BOUND, vec.length)
        masks.values[name] = mask
        masked[name] = add_plain_vector(backend, vec, mask)
    return masked, masks


def unmask_state(
    backend: HEBackend, refreshed: dict[str, EncryptedVector], masks: Masks
) -> dict[str, EncryptedVector]:
    """Remove the masks from the refresher's fresh, full-depth ciphertexts."""
    if set(refreshed) != set(masks.values):
        raise ValueError(f"refresh returned {sorted(refreshed)}, expected {sorted(masks.values)}")
    return {name: add_plain_vector(backend, vec, -masks.values[name]) for name, vec in refreshed.items()}


def add_plain_vector(backend: HEBackend, vec: EncryptedVector, values: np.ndarray) -> EncryptedVector:
    """Add a plaintext vector (a mask, or minus one) chunk by chunk; no level is used."""
    slots = backend.slots
    padded = pad_to_chunks(values, slots)
    return EncryptedVector(
        [backend.add_plain(c, padded[i * slots : (i + 1) * slots]) for i, c in enumerate(vec.chunks)],
        vec.length,
    )


__all__ = [
    "HEAdamConfig",
    "HEAdamConfigError",
    "HEAdamState",
    "InverseSqrtPolynomial",
    "Masks",
    "STATE_NAMES",
    "evaluate_polynomial",
    "assemble_step",
    "he_adam_step",
    "initial_optimizer_state",
    "mask_state",
    "refresh_due",
    "step_levels",
    "step_chunk",
    "unmask_state",
]

"""Encrypted robust aggregation: masked squared norms, a key holder's slot sums, plaintext clipping.

The coordinator holds each participant's update ``Enc(u_i)`` (pre-weighted 1/n and pre-scaled by
HE-Adam's s) and never decrypts. Per round:

1. ``Enc(y_i) = r_i * Enc(u_i) (*) Enc(u_i) + m_i`` slot-wise (the chunks of a long vector are
   squared and added first): one ciphertext product and one plaintext-scalar product, so 2 levels
   of a *side* ciphertext; the update itself is untouched. ``r_i`` is a secret factor, drawn
   independently per participant and round, log-uniform on [2^4, 2^12]; ``m_i`` is a secret mask,
   uniform in +-2^15 per slot minus its mean, so its slots sum to zero. The list is shuffled.
2. One key holder (this round's refresher) decrypts each ``y_i`` and returns only the slot sum
   ``r_i |u_i|^2``, rounded to 4 significant digits. It sees neither a norm (only a norm times an
   unknown factor, which also hides ratios between participants) nor any update coordinate
   (every slot is masked by a +-2^15 uniform, as in the refresh masks: statistical hiding).
3. The coordinator divides by ``r_i`` and gets the squared norms, from which it computes
   plaintext factors ``f_i <= 1``: ``norm-bound`` clips every update to a fixed L2 bound,
   ``median-norm`` to min(median of the norms, the bound). It learns the n norms (and
   nothing else about the updates), which is this design's stated leakage.
4. The aggregate is ``sum_i f_i Enc(u_i)``. A plaintext scalar product consumes one level, and
   HE-Adam needs its input at full depth (``coordinator/he_adam.py``: u*u -> x -> P(x) -> w*P is
   the critical path), so a robust defense needs a profile with one level to spare: ``n16k-d7``
   for the default degree-7 step. Updates with ``f_i = 1`` are added unchanged.

Why no Galois keys: summing slots on the coordinator needs rotations, and TenSEAL 0.3.18 can only
generate SEAL's full power-of-two set, which grows coordinator.ctx from 13.7 MB to 326 MB at
N=16384 (measured). Letting a key holder add the masked slots costs no keys and the same leakage.
Coordinate-wise median, trimmed mean, Krum's selection and Bulyan need comparisons between
encrypted values, which CKKS cannot do without deep sign approximations; they are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from coordinator.secret_random import secret_permutation, secret_uniform
from protos.backend import HEBackend
from protos.codec import EncryptedVector, map_chunks
from protos.optimizer import MASK_BOUND

ROBUST_DEFENSES = ("norm-bound", "median-norm")
FACTOR_LOG2_RANGE = (4.0, 12.0)


class DefenseError(ValueError):
    """A defense that cannot run with this key or configuration."""


@dataclass
class NormMasks:
    """The coordinator's secrets for one exchange: factors and the shuffle."""

    factors: np.ndarray  # r_i, in participant order
    order: np.ndarray  # position k of the query holds participant order[k]


def masked_squared_norms(
    backend: HEBackend, updates: list[EncryptedVector]
) -> tuple[list[EncryptedVector], NormMasks]:
    """Per update one ciphertext whose slots sum to r_i |u_i|^2 (and say nothing else).

    Factors, order and masks are secret draws from OS entropy (``coordinator.secret_random``).
    """
    factors = 2.0 ** secret_uniform(*FACTOR_LOG2_RANGE, len(updates))
    order = secret_permutation(len(updates))
    out = [masked_square_sum(backend, updates[i], float(factors[i])) for i in order]
    return out, NormMasks(factors, order)


def secret_factor() -> float:
    """r: a secret factor, log-uniform on [2^4, 2^12]."""
    return float(2.0 ** secret_uniform(*FACTOR_LOG2_RANGE, 1)[0])


def masked_square_sum(backend: HEBackend, vec: EncryptedVector, factor: float, offset: float = 0.0) -> EncryptedVector:
    """One ciphertext whose slots sum to ``factor * |vec|^2 + offset`` and are each masked by a
    secret uniform in +-2^15: a key holder that sums them learns that number and nothing else."""
    squares = [backend.mul(c, c) for c in vec.chunks]
    total = squares[0]
    for sq in squares[1:]:
        total = backend.add(total, sq)
    total = backend.mul_scalar(total, factor)
    mask = secret_uniform(-MASK_BOUND, MASK_BOUND, backend.slots)
    mask += offset / backend.slots - mask.mean()
    return EncryptedVector([backend.add_plain(total, mask)], backend.slots)


def unmask_squared_norms(masked_sums: list[float], masks: NormMasks) -> np.ndarray:
    if len(masked_sums) != len(masks.order):
        raise ValueError(f"key holder returned {len(masked_sums)} sums for {len(masks.order)} updates")
    out = np.zeros(len(masks.order))
    for value, i in zip(masked_sums, masks.order):
        out[i] = max(float(value), 0.0) / masks.factors[i]
    return out


def clip_factors(norms: np.ndarray, defense: str, bound: float) -> np.ndarray:
    """f_i = min(1, threshold / |u_i|) with the defense's threshold."""
    if defense == "norm-bound":
        threshold = bound
    elif defense == "median-norm":
        threshold = min(float(np.median(norms)), bound)
    else:
        raise DefenseError(f"{defense!r} is not a robust aggregation rule ({', '.join(ROBUST_DEFENSES)})")
    with np.errstate(divide="ignore"):
        return np.where(norms > threshold, threshold / np.maximum(norms, 1e-300), 1.0)


def weighted_sum(backend: HEBackend, updates: list[EncryptedVector], factors: np.ndarray) -> EncryptedVector:
    """sum_i f_i Enc(u_i); a factor < 1 costs one level of that update, f_i = 1 none."""
    scaled = [
        vec if f >= 1.0 else map_chunks(lambda c, f=float(f): backend.mul_scalar(c, f), vec)
        for vec, f in zip(updates, factors)
    ]
    return reduce(lambda a, b: map_chunks(backend.add, a, b), scaled)


def check_profile_supports(defense: str, levels: int, adam_depth: int, profile_name: str) -> None:
    if defense in ROBUST_DEFENSES and levels < adam_depth + 1:
        raise DefenseError(
            f"defense {defense} scales updates by plaintext factors before HE-Adam, which costs one "
            f"level: HE-Adam needs {adam_depth} and profile {profile_name} has {levels}. Use a "
            f"profile with {adam_depth + 1} levels (n16k-d7: `fedhe keygen --profile n16k-d7`)"
        )


__all__ = [
    "DefenseError",
    "NormMasks",
    "ROBUST_DEFENSES",
    "check_profile_supports",
    "clip_factors",
    "masked_square_sum",
    "masked_squared_norms",
    "secret_factor",
    "unmask_squared_norms",
    "weighted_sum",
]

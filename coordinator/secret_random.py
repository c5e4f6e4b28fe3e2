"""The coordinator's secret randomness: OS entropy and a ChaCha20 keystream, never a seed.

Refresh masks, masked-norm factors, masks and permutations hide values from key holders; anyone
who could replay them could unmask what they were given (docs/threat-model.md, "A coordinator
that deviates"). So nothing here takes a seed: every draw keys a fresh ChaCha20 stream
(``cryptography``) with 32 bytes from ``os.urandom`` and forgets the key. Run settings and
checkpoints hold no trace of it. Public randomness (environments, initialization) keeps its seeds
elsewhere.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_UNIT = 2.0**-53  # 53 random bits -> a uniform double in [0, 1)


def secret_unit(size: int) -> np.ndarray:
    """``size`` independent uniforms in [0, 1) from a fresh, forgotten ChaCha20 key."""
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    words = np.frombuffer(cipher.encryptor().update(bytes(8 * size)), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * _UNIT


def secret_uniform(low: float, high: float, size: int) -> np.ndarray:
    return low + (high - low) * secret_unit(size)


def secret_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of range(n) from OS entropy."""
    order = list(range(n))
    secrets.SystemRandom().shuffle(order)
    return np.array(order, dtype=np.int64)

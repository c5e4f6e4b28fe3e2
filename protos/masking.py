"""The arithmetic of masks both sides share: the grid, keystream integers and self-masks.

Participants mask their update and statistics before encrypting them (``participant.pairwise_masks``):
pairwise masks that cancel in the sum, plus a self-mask from a fresh seed of their own (double
masking, Bonawitz et al., CCS 2017). Once enough other survivors reveal their shares of a seed,
the coordinator rebuilds it and subtracts that self-mask from the encrypted sum, so it must expand
a seed exactly as its owner did: that expansion lives here, with the grid every mask is drawn on.

Exactness: every mask is an integer times a grid ``g = R / 2^(b-1)`` (``R`` the stream's bound),
with ``b`` chosen so that ``terms`` masks (a participant's pair masks plus its self-mask, at most
the roster size) sum below 2^53. Values are rounded to the same grid before a mask is added, so
masked values are exact in float64 and the masks cancel (or are subtracted) without error.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FLOAT_BITS = 53  # integers up to 2^53 are exact in float64
SEED_BYTES = 16  # a self-mask seed: one Shamir secret (pycryptodome splits 16 bytes)
SELF_MASK_INFO = b"fedhe-rl self-mask v1"


@dataclass(frozen=True)
class MaskStream:
    name: str
    bound: float  # R: each mask is uniform in [-R, R) per value


UPDATE_STREAM = MaskStream("update", 2.0**16)
STATS_STREAM = MaskStream("stats", 2.0**32)
STREAMS = (UPDATE_STREAM, STATS_STREAM)


def mask_bits(terms: int) -> int:
    """b: bits of one mask, so that ``terms`` of them sum exactly below 2^53."""
    return FLOAT_BITS - (max(terms, 2) - 1).bit_length()


def mask_grid(stream: MaskStream, terms: int) -> float:
    """g: the value of one integer step of a mask (a power of two)."""
    return stream.bound / 2.0 ** (mask_bits(terms) - 1)


def hiding_bound(stream: MaskStream, value_bound: float) -> float:
    """Statistical distance, per coordinate, between the masked views of two values within +-value_bound."""
    return value_bound / stream.bound


def keystream_integers(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` integers uniform in [-2^(bits-1), 2^(bits-1)): the top bits of a ChaCha20 keystream."""
    cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
    words = np.frombuffer(cipher.encryptor().update(bytes(8 * length)), dtype="<u8")
    return (words >> np.uint64(64 - bits)).astype(np.int64) - np.int64(2 ** (bits - 1))


@dataclass(frozen=True)
class SelfMaskContext:
    """What a self-mask seed is bound to: one federation, run, round and sender."""

    fingerprint: str
    run_id: int
    round: int
    sender: int

    def encode(self) -> bytes:
        return b"\0".join([SELF_MASK_INFO, self.fingerprint.encode(),
                           struct.pack(">QQI", self.run_id, self.round, self.sender)])

    def commitment(self, seed: bytes) -> bytes:
        """SHA-256 over the context and the seed: lets the coordinator check a rebuilt seed.

        The seed is 128 random bits, so the digest reveals nothing usable about it."""
        return hashlib.sha256(self.encode() + b"\0" + seed).digest()


def self_mask_integers(
    seed: bytes, context: SelfMaskContext, stream: MaskStream, length: int, terms: int
) -> np.ndarray:
    """The self-mask of ``context.sender`` for one stream, as integers on the grid."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a self-mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=context.encode() + b"\0" + stream.name.encode()).derive(seed)
    return keystream_integers(key, length, mask_bits(terms))


def self_mask(seed: bytes, context: SelfMaskContext, stream: MaskStream, length: int, terms: int) -> np.ndarray:
    """The self-mask as float64 values (integers times the grid): exact."""
    return self_mask_integers(seed, context, stream, length, terms).astype(np.float64) * mask_grid(stream, terms)


def default_threshold(members: int) -> int:
    """Shares of a seed needed to rebuild it: a majority of the other members, at least 2.

    Rebuilding a seed needs ``threshold`` members to reveal their shares, so the coordinator plus
    fewer colluding members than that never can; at least 2, so one key holder never suffices.
    Each member chooses its own (node policy ``self-mask-threshold``); this is the default."""
    return max(2, (members - 1) // 2 + 1)

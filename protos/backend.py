"""The HE backend interface: what can be computed on encrypted chunks without a secret key.

The coordinator's round logic and HE-Adam only talk to ``HEBackend``; this keeps the door open
for a threshold-CKKS backend (e.g. OpenFHE) later. Decryption is deliberately absent here: it
lives in ``participant.keyholder``, which the coordinator never imports, and the coordinator's
TenSEAL context holds no secret key in the first place.

Two implementations share one protocol so overhead comparisons are apples to apples:
``TensealBackend`` (CKKS) and ``PlainBackend`` (identity "encryption" for ``--plaintext``).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import tenseal as ts

from protos.errors import ChunkLayoutError, InvalidCiphertextError
from protos.fedhe.v1 import wire_pb2
from protos.profiles import HEProfile
from protos.seal_ops import switch_to_level

Chunk = Any  # a ts.CKKSVector or, in plaintext mode, a float64 ndarray


class HEBackend(ABC):
    """Element-wise arithmetic on chunks of at most ``profile.slots`` values."""

    encoding: int

    def __init__(self, profile: HEProfile, fingerprint: str) -> None:
        self.profile = profile
        self.fingerprint = fingerprint

    @property
    def slots(self) -> int:
        return self.profile.slots

    @abstractmethod
    def encrypt(self, values: np.ndarray) -> Chunk:
        """Encrypt at most ``slots`` values (public key only)."""

    @abstractmethod
    def serialize(self, chunk: Chunk) -> bytes: ...

    def encrypt_serialized(self, values: np.ndarray) -> bytes:
        """A fresh encryption's wire bytes (a key holder's: seeded, half the size)."""
        return self.serialize(self.encrypt(values))

    def serialize_for_decryption(self, chunk: Chunk, level: int = 0) -> bytes:
        """Wire bytes for a receiver that only decrypts (CKKS: switched down to ``level``, or kept
        at its own level if that is lower)."""
        return self.serialize(chunk)

    @abstractmethod
    def deserialize(self, data: bytes, length: int, *, fresh: bool = False) -> Chunk:
        """Parse and validate one chunk holding ``length`` values; raise a WireError if invalid.

        ``fresh``: the chunk must be a fresh encryption, at full depth and exactly the profile's
        scale (what participants send); anything else could not be added to other fresh chunks.
        """

    @abstractmethod
    def add(self, a: Chunk, b: Chunk) -> Chunk: ...

    @abstractmethod
    def sub(self, a: Chunk, b: Chunk) -> Chunk: ...

    @abstractmethod
    def mul(self, a: Chunk, b: Chunk) -> Chunk:
        """Ciphertext product (consumes one level)."""

    @abstractmethod
    def mul_scalar(self, a: Chunk, c: float) -> Chunk:
        """Product with a public scalar (consumes one level)."""

    @abstractmethod
    def add_scalar(self, a: Chunk, c: float) -> Chunk: ...

    @abstractmethod
    def add_plain(self, a: Chunk, values: np.ndarray) -> Chunk:
        """Add a public (or coordinator-secret, e.g. a mask) plaintext vector; no level used."""

    @abstractmethod
    def levels_left(self, chunk: Chunk) -> int:
        """Multiplications this chunk still supports."""


def public_fingerprint(profile_name: str, public_key_bytes: bytes) -> str:
    """Short, stable identifier of a federation key, computed only from public material."""
    digest = hashlib.sha256(profile_name.encode() + b"\0" + public_key_bytes).hexdigest()
    return digest[:32]


class TensealBackend(HEBackend):
    """CKKS through TenSEAL. Built from a context that may or may not hold a secret key."""

    encoding = wire_pb2.ENCODING_CKKS

    def __init__(self, context: ts.Context, profile: HEProfile, fingerprint: str) -> None:
        super().__init__(profile, fingerprint)
        self.context = context

    def encrypt(self, values: np.ndarray) -> ts.CKKSVector:
        return ts.ckks_vector(self.context, np.asarray(values, dtype=np.float64))

    def serialize(self, chunk: ts.CKKSVector) -> bytes:
        return chunk.serialize()

    def serialize_for_decryption(self, chunk: ts.CKKSVector, level: int = 0) -> bytes:
        if self.levels_left(chunk) <= level:
            return self.serialize(chunk)
        return switch_to_level(self.context, chunk, level)

    def deserialize(self, data: bytes, length: int, *, fresh: bool = False) -> ts.CKKSVector:
        try:
            vec = ts.ckks_vector_from(self.context, data)
            size = vec.size()
            (ct,) = vec.ciphertext()
            polys, primes, scale = ct.size(), ct.coeff_modulus_size(), ct.scale
        except Exception as exc:  # TenSEAL/SEAL raise a zoo of types on garbage input
            raise InvalidCiphertextError(
                f"chunk is not a valid CKKS ciphertext for profile {self.profile.name} "
                f"({type(exc).__name__}: {exc}); the sender may use another key or library version"
            ) from None
        if size != length:
            raise ChunkLayoutError(f"chunk holds {size} values, layout says {length}")
        if polys != 2:
            raise InvalidCiphertextError(f"ciphertext has {polys} polynomials, expected 2")
        full = self.profile.levels + 1
        if not 1 <= primes <= full:
            raise InvalidCiphertextError(f"ciphertext has {primes} primes, profile allows 1..{full}")
        if fresh and primes != full:
            raise InvalidCiphertextError(
                f"ciphertext is at level {primes - 1} of {self.profile.levels}; updates must be "
                "freshly encrypted at full depth"
            )
        if fresh and scale != 2.0**self.profile.scale_bits:
            raise InvalidCiphertextError(
                f"ciphertext scale {scale:.6g} is not the profile's 2^{self.profile.scale_bits}; "
                "updates must be freshly encrypted with the federation's context"
            )
        if not 0.5 < scale / 2.0**self.profile.scale_bits < 2.0:
            raise InvalidCiphertextError(f"ciphertext scale 2^{np.log2(scale):.1f} is off-profile")
        return vec

    # TenSEAL's automatic modulus switching lowers a higher-level *right* operand in place, which
    # would silently degrade a ciphertext the caller still holds (the kept state after a failed
    # round). So the higher-level operand always goes on the left: TenSEAL copies the left one.
    def add(self, a: ts.CKKSVector, b: ts.CKKSVector) -> ts.CKKSVector:
        return b + a if _primes(b) > _primes(a) else a + b

    def sub(self, a: ts.CKKSVector, b: ts.CKKSVector) -> ts.CKKSVector:
        return -(b - a) if _primes(b) > _primes(a) else a - b

    def mul(self, a: ts.CKKSVector, b: ts.CKKSVector) -> ts.CKKSVector:
        return b * a if _primes(b) > _primes(a) else a * b

    def mul_scalar(self, a: ts.CKKSVector, c: float) -> ts.CKKSVector:
        return a * float(c)

    def add_scalar(self, a: ts.CKKSVector, c: float) -> ts.CKKSVector:
        return a + float(c)

    def add_plain(self, a: ts.CKKSVector, values: np.ndarray) -> ts.CKKSVector:
        return a + np.asarray(values, dtype=np.float64).tolist()

    def levels_left(self, chunk: ts.CKKSVector) -> int:
        return _primes(chunk) - 1


def _primes(chunk: ts.CKKSVector) -> int:
    (ct,) = chunk.ciphertext()
    return ct.coeff_modulus_size()


class PlainBackend(HEBackend):
    """Identity "encryption" with the same chunk layout and protocol, for baselines."""

    encoding = wire_pb2.ENCODING_PLAIN_F64

    def __init__(self, profile: HEProfile) -> None:
        super().__init__(profile, public_fingerprint(profile.name, b"plaintext-baseline"))

    def encrypt(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, dtype=np.float64)

    def serialize(self, chunk: np.ndarray) -> bytes:
        return np.ascontiguousarray(chunk, dtype="<f8").tobytes()

    def deserialize(self, data: bytes, length: int, *, fresh: bool = False) -> np.ndarray:
        if len(data) != 8 * length:
            raise ChunkLayoutError(f"plain chunk has {len(data)} bytes, expected {8 * length}")
        return np.frombuffer(data, dtype="<f8").astype(np.float64)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a - b

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    def mul_scalar(self, a: np.ndarray, c: float) -> np.ndarray:
        return a * c

    def add_scalar(self, a: np.ndarray, c: float) -> np.ndarray:
        return a + c

    def add_plain(self, a: np.ndarray, values: np.ndarray) -> np.ndarray:
        return a + values

    def levels_left(self, chunk: np.ndarray) -> int:
        return self.profile.levels

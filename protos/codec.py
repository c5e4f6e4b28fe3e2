"""Flat float vector <-> fewest ciphertext chunks <-> protobuf bytes, with strict validation.

Decoding never trusts the sender: size limit first, then protobuf parsing, protocol version,
key fingerprint, HE profile, chunk layout, and finally every chunk's ciphertext. Each failure is
a typed ``WireError`` naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from protos.backend import Chunk, HEBackend
from protos.errors import (
    ChunkLayoutError,
    FingerprintMismatchError,
    MalformedMessageError,
    NonFiniteValueError,
    PayloadTooLargeError,
    ProfileMismatchError,
    UnsupportedVersionError,
)
from protos.fedhe.v1 import wire_pb2

PROTOCOL_VERSION = 2  # 2: double masks, the integrity check, statistics released in the round
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

M = TypeVar("M", bound=Message)


@dataclass
class EncryptedVector:
    """An in-memory encrypted vector: ordered chunks plus the true length.

    Every chunk is full (``slots`` values, the tail zero-padded). TenSEAL replicates a short
    vector across all slots when encrypting but not when adding a plaintext, so partial chunks
    would leave stale copies (e.g. of refresh masks) in the spare slots; large values there
    ruin the precision of every slot at decoding time.
    """

    chunks: list[Chunk]
    length: int
    # The chunks' bytes once serialized: theta and the summed statistics go both into the
    # checkpoint and into the next round's messages, and serializing a chunk costs ~10 ms.
    # Safe because a vector is never changed in place (every operation makes a new one).
    serialized: list[bytes] | None = field(default=None, repr=False, compare=False)
    serialized_for_decryption: list[bytes] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.length < 1 or not self.chunks:
            raise ChunkLayoutError("an encrypted vector needs at least one value")


def chunk_count(length: int, slots: int) -> int:
    """The fewest chunks that hold ``length`` values."""
    return -(-length // slots)


def pad_to_chunks(values: np.ndarray, slots: int) -> np.ndarray:
    """Zero-pad a flat vector to a whole number of chunks."""
    padded = np.zeros(chunk_count(values.size, slots) * slots, dtype=np.float64)
    padded[: values.size] = values
    return padded


def encryptable(values: np.ndarray) -> np.ndarray:
    """``values`` as a flat float64 vector, refused if empty, not flat or not finite."""
    flat = np.asarray(values, dtype=np.float64)
    if flat.ndim != 1 or flat.size == 0:
        raise ChunkLayoutError(f"expected a non-empty flat vector, got shape {flat.shape}")
    if not np.all(np.isfinite(flat)):
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise NonFiniteValueError(f"refusing to encrypt a vector with {bad} NaN/inf values")
    return flat


def encrypt_vector(backend: HEBackend, values: np.ndarray) -> EncryptedVector:
    """Encrypt a flat vector of any length as ceil(length / slots) chunks."""
    flat = encryptable(values)
    slots = backend.slots
    padded = pad_to_chunks(flat, slots)
    chunks = [backend.encrypt(padded[i : i + slots]) for i in range(0, padded.size, slots)]
    return EncryptedVector(chunks, int(flat.size))


def encrypt_to_proto(backend: HEBackend, values: np.ndarray) -> wire_pb2.EncryptedVector:
    """A flat vector encrypted for the wire, as ``to_proto(encrypt_vector(...))`` but with the
    backend's own fresh encryption (a key holder's is seeded: half the bytes)."""
    flat = encryptable(values)
    padded = pad_to_chunks(flat, backend.slots)
    chunks = [backend.encrypt_serialized(padded[i : i + backend.slots]) for i in range(0, padded.size, backend.slots)]
    return proto_of_chunks(backend, chunks, int(flat.size))


def map_chunks(fn: Callable[..., Chunk], *vectors: EncryptedVector) -> EncryptedVector:
    """Apply a chunk-wise operation to vectors with the same layout."""
    first = vectors[0]
    if any(v.length != first.length for v in vectors):
        raise ChunkLayoutError("vectors of different lengths cannot be combined")
    return EncryptedVector([fn(*cs) for cs in zip(*(v.chunks for v in vectors))], first.length)


def to_proto(backend: HEBackend, vector: EncryptedVector) -> wire_pb2.EncryptedVector:
    if vector.serialized is None:
        vector.serialized = [backend.serialize(c) for c in vector.chunks]
    return proto_of_chunks(backend, vector.serialized, vector.length)


# A receiver that only decrypts needs one prime, where values stay below 2^19 (60-bit prime, 40-bit
# scale): enough for masked state, theta and masked gradients. Where a hostile sender could make a
# value arbitrarily large (integrity and norm checks, summed statistics), two primes keep 2^59 of
# headroom, so a value wrapping around the modulus cannot pass for a small one by chance.
LAST_LEVEL, HEADROOM_LEVEL = 0, 1


def to_proto_for_decryption(backend: HEBackend, vector: EncryptedVector, level: int = LAST_LEVEL
                            ) -> wire_pb2.EncryptedVector:
    """For a receiver that only decrypts (a key holder): switched down to ``level`` first, so ~6x
    smaller at N=16384 at the last level (``HEBackend.serialize_for_decryption``)."""
    if level != LAST_LEVEL:
        return proto_of_chunks(backend, [backend.serialize_for_decryption(c, level) for c in vector.chunks],
                               vector.length)
    if vector.serialized_for_decryption is None:
        vector.serialized_for_decryption = [backend.serialize_for_decryption(c) for c in vector.chunks]
    return proto_of_chunks(backend, vector.serialized_for_decryption, vector.length)


def proto_of_chunks(backend: HEBackend, chunks: list[bytes], length: int) -> wire_pb2.EncryptedVector:
    """The wire message around already serialized chunks (e.g. serialized by worker processes)."""
    return wire_pb2.EncryptedVector(
        protocol_version=PROTOCOL_VERSION,
        key_fingerprint=backend.fingerprint,
        he_profile=backend.profile.name,
        length=length,
        slots_per_chunk=backend.slots,
        chunks=chunks,
        encoding=backend.encoding,
    )


def check_version(version: int, what: str) -> None:
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"{what} uses protocol version {version}; this node speaks {PROTOCOL_VERSION}. "
            "Upgrade fedhe-rl so all nodes run the same release."
        )


def from_proto(
    backend: HEBackend,
    msg: wire_pb2.EncryptedVector,
    *,
    expected_length: int | None = None,
    fresh: bool = False,
) -> EncryptedVector:
    """Validate the header and layout, then every chunk."""
    check_header(backend, msg, expected_length=expected_length)
    chunks = [backend.deserialize(data, backend.slots, fresh=fresh) for data in msg.chunks]
    return EncryptedVector(chunks, int(msg.length))


def check_header(backend: HEBackend, msg: wire_pb2.EncryptedVector, *, expected_length: int | None = None) -> None:
    """Everything but the chunks' ciphertexts: version, key, profile, layout and chunk sizes.

    ``from_proto`` checks the chunks next; callers that hand the chunks to worker processes
    (``coordinator.chunk_workers``) have each worker check its own.
    """
    check_version(msg.protocol_version, "encrypted vector")
    if msg.key_fingerprint != backend.fingerprint:
        raise FingerprintMismatchError(
            f"vector was encrypted under key {msg.key_fingerprint[:12] or '(none)'}…, this "
            f"federation uses {backend.fingerprint[:12]}…; the sender has another key set "
            "(check fingerprint.txt on both sides)"
        )
    if msg.he_profile != backend.profile.name:
        raise ProfileMismatchError(
            f"vector uses HE profile {msg.he_profile!r}, this federation uses "
            f"{backend.profile.name!r}"
        )
    if msg.encoding != backend.encoding:
        raise ProfileMismatchError(
            f"vector encoding {msg.encoding} does not match this federation's "
            f"{backend.encoding} (encrypted vs --plaintext mismatch?)"
        )
    if msg.slots_per_chunk != backend.slots:
        raise ChunkLayoutError(f"slots_per_chunk {msg.slots_per_chunk} != {backend.slots}")
    if expected_length is not None and msg.length != expected_length:
        raise ChunkLayoutError(f"vector has {msg.length} values, expected {expected_length}")
    if msg.length < 1:
        raise ChunkLayoutError("vector declares length 0")
    expected_chunks = chunk_count(msg.length, backend.slots)
    if len(msg.chunks) != expected_chunks:
        raise ChunkLayoutError(
            f"{len(msg.chunks)} chunks cannot hold {msg.length} values "
            f"({expected_chunks} expected)"
        )
    limit = chunk_byte_limit(backend)
    if any(len(data) > limit for data in msg.chunks):
        raise PayloadTooLargeError(f"a chunk exceeds the {limit} bytes a ciphertext of this profile can take")


def chunk_byte_limit(backend: HEBackend) -> int:
    """The most bytes one serialized chunk of this profile can take (plain chunks included)."""
    return max(backend.profile.max_chunk_bytes(), 8 * backend.slots + 1024)


def max_bytes_for(backend: HEBackend, length: int | None, vectors: int = 1) -> int:
    """A tight size limit when the layout is known, else a global cap."""
    if length is None:
        return DEFAULT_MAX_BYTES
    return vectors * (chunk_count(length, backend.slots) * chunk_byte_limit(backend) + 4096)


def parse_message(cls: type[M], data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Parse protobuf bytes with a size limit; never raises anything but WireError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"{cls.DESCRIPTOR.name} of {len(data)} bytes exceeds the limit of {max_bytes} bytes"
        )
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedMessageError(
            f"bytes are not a valid {cls.DESCRIPTOR.full_name} ({exc}); truncated or garbage?"
        ) from None
    return msg

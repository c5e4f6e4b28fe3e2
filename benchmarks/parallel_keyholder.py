"""The key holder's decryption and re-encryption with one chunk per worker process (benchmarks only).

A key holder in a federation decrypts and re-encrypts in its own process
(``participant.keyholder``); ``fedhe bench he-adam --workers N`` and ``fedhe bench scale`` use
these to measure what worker processes would save it.

Both work from the wire message and the re-encryption back to one: each worker checks its chunk
(``HEBackend.deserialize``), decrypts it and, for a re-encryption, encrypts and serializes the
fresh chunk, so the only bytes crossing the process boundary are the ones on the wire anyway
(``coordinator.chunk_workers``, the same pool type as the coordinator's). The workers hold this
organization's secret key; they are its own processes on its own machine. Results equal
``decrypt_vector(from_proto(...))`` and ``to_proto(reencrypt(from_proto(...)))`` (re-encryption
is randomized, so equal after decryption).
"""

from __future__ import annotations

import numpy as np
import tenseal as ts

from coordinator.chunk_workers import ChunkWorkers
from participant.keyholder import KeyHolder, TensealKeyHolder, finite_decryption
from protos.codec import check_header, proto_of_chunks
from protos.fedhe.v1 import wire_pb2
from protos.profiles import get_profile


def keyholder_from(context_bytes: bytes, profile_name: str, fingerprint: str) -> TensealKeyHolder:
    """A worker's key holder, set up as ``keyholder.load_keyholder`` does (the bytes hold the secret key)."""
    profile = get_profile(profile_name)
    context = ts.context_from(context_bytes)
    context.global_scale = 2.0**profile.scale_bits
    return TensealKeyHolder(context, profile, fingerprint)


def keyholder_workers(holder: KeyHolder, workers: int | None = None) -> ChunkWorkers:
    """Worker processes holding ``holder``'s key (in-process for the plaintext baseline)."""
    return ChunkWorkers(holder, workers, factory=keyholder_from)


def decrypt_chunk(holder: KeyHolder, data: bytes, valid: int) -> tuple[np.ndarray]:
    """The first ``valid`` values of one wire chunk (runs in a worker)."""
    return (finite_decryption(holder.decrypt(holder.deserialize(data, holder.slots))[:valid]),)


def reencrypt_chunk(holder: KeyHolder, data: bytes, valid: int) -> tuple[bytes]:
    """One wire chunk decrypted and encrypted afresh at full depth, zero padding as ``encrypt_vector``."""
    (values,) = decrypt_chunk(holder, data, valid)
    padded = np.zeros(holder.slots)
    padded[:valid] = values
    return (holder.serialize(holder.encrypt(padded)),)


def _groups(holder: KeyHolder, msg: wire_pb2.EncryptedVector) -> list[tuple[bytes, int]]:
    slots = holder.slots
    return [(data, min(slots, msg.length - i * slots)) for i, data in enumerate(msg.chunks)]


def decrypt_message(
    workers: ChunkWorkers, msg: wire_pb2.EncryptedVector, *, expected_length: int | None = None
) -> np.ndarray:
    """``decrypt_vector(holder, from_proto(holder, msg, expected_length=...))`` over ``workers``."""
    holder = workers.backend
    check_header(holder, msg, expected_length=expected_length)
    return np.concatenate([values for (values,) in workers.map(decrypt_chunk, _groups(holder, msg))])


def reencrypt_message(
    workers: ChunkWorkers, msg: wire_pb2.EncryptedVector, *, expected_length: int | None = None
) -> wire_pb2.EncryptedVector:
    """``to_proto(holder, reencrypt(holder, from_proto(holder, msg, ...)))`` over ``workers``."""
    holder = workers.backend
    check_header(holder, msg, expected_length=expected_length)
    chunks = [data for (data,) in workers.map(reencrypt_chunk, _groups(holder, msg))]
    return proto_of_chunks(holder, chunks, int(msg.length))

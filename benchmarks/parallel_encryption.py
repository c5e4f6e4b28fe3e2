"""Encrypting a vector straight to its wire message, one chunk per worker process (benchmarks only).

A participant encrypts in its own process (``protos.codec.encrypt_to_proto``); ``fedhe bench
scale`` uses this for the encryption of large synthetic updates.

Encryption (~14 ms per chunk) and serialization (~10 ms at full depth) are both per chunk, and
the wire needs the bytes anyway, so a worker does both and only bytes come back
(``coordinator.chunk_workers``). Same checks and layout as ``codec.to_proto(codec.encrypt_vector(...))``.
"""

from __future__ import annotations

import numpy as np

from coordinator.chunk_workers import ChunkWorkers
from protos.backend import HEBackend
from protos.codec import chunk_count, encryptable, pad_to_chunks, proto_of_chunks
from protos.fedhe.v1 import wire_pb2


def encrypt_chunk(backend: HEBackend, values: np.ndarray) -> tuple[bytes]:
    """One chunk of ``slots`` values, encrypted and serialized (runs in a worker)."""
    return (backend.serialize(backend.encrypt(values)),)


def encrypt_message(workers: ChunkWorkers, values: np.ndarray) -> wire_pb2.EncryptedVector:
    """``to_proto(backend, encrypt_vector(backend, values))`` with the chunks spread over ``workers``."""
    backend = workers.backend
    flat = encryptable(values)
    slots = backend.slots
    padded = pad_to_chunks(flat, slots)
    groups = [(padded[i * slots : (i + 1) * slots],) for i in range(chunk_count(flat.size, slots))]
    chunks = [data for (data,) in workers.map(encrypt_chunk, groups)]
    return proto_of_chunks(backend, chunks, int(flat.size))

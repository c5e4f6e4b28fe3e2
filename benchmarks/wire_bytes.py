"""One encrypted vector as the bytes of its own wire message, and back (benchmarks and tests).

A federation never sends a lone vector: it sends whole messages (``protos.messages``), read with
``protos.codec.parse_message`` and ``from_proto``. Benchmarks and tests that play several roles in
one process pass single vectors between them through these two, so every hop is serialized and
checked as a receiver checks it.
"""

from __future__ import annotations

from protos.backend import HEBackend
from protos.codec import EncryptedVector, from_proto, max_bytes_for, parse_message, to_proto
from protos.fedhe.v1 import wire_pb2


def encode_vector(backend: HEBackend, vector: EncryptedVector) -> bytes:
    """``vector``'s wire message, serialized."""
    return to_proto(backend, vector).SerializeToString()


def decode_vector(
    backend: HEBackend,
    data: bytes,
    *,
    expected_length: int | None = None,
    max_bytes: int | None = None,
    fresh: bool = False,
) -> EncryptedVector:
    """Bytes from ``encode_vector`` read as a receiver reads them: size limit, parsing, header, every chunk."""
    limit = max_bytes if max_bytes is not None else max_bytes_for(backend, expected_length)
    msg = parse_message(wire_pb2.EncryptedVector, data, max_bytes=limit)
    return from_proto(backend, msg, expected_length=expected_length, fresh=fresh)

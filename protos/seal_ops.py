"""Two wire savings TenSEAL does not expose, done with SEAL's own binding (``tenseal.sealapi``).

* ``encrypt_seeded``: symmetric (secret-key) encryption keeps its second polynomial as a PRNG seed
  when saved, so a participant's fresh upload is half the bytes of a public-key encryption. SEAL
  expands the seed on load: the receiver gets an ordinary full-depth ciphertext.
* ``switch_to_level``: a ciphertext whose receiver only decrypts it (or needs few levels) can drop
  primes first; at the last level it is ~6x smaller and much cheaper to serialize. Needs no secret
  key, so the coordinator can do it.

Both produce TenSEAL ``CKKSVector`` bytes (a ``CKKSVectorProto`` around SEAL ciphertext bytes), so
``ts.ckks_vector_from`` and ``TensealBackend.deserialize`` read them unchanged. SEAL's Python
binding saves and loads only through file paths, so each ciphertext goes through a scratch file on
tmpfs (``/dev/shm``; measured ~2x faster than a disk-backed ``/tmp`` for a 1.4 MB ciphertext).

Levels count as in ``HEBackend.levels_left``: a ciphertext with ``k`` primes is at level ``k - 1``;
fresh ciphertexts are at ``profile.levels``, the last level is 0. This equals SEAL's chain index.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protos.errors import ChunkLayoutError, NonFiniteValueError

SCRATCH_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # None: tempfile's default


class SecretKeyRequiredError(ValueError):
    """Seeded (symmetric) encryption needs the secret key; the coordinator's context has none."""


class LevelError(ValueError):
    """A modulus switch to a level the ciphertext cannot reach (switching only goes down)."""


def _ckks_vector_proto_class() -> type:
    """TenSEAL's ``tenseal.CKKSVectorProto`` (tensors.proto), built in a private descriptor pool.

    TenSEAL ships the .proto but no Python module for it; a private pool cannot clash with any
    other registration of the same name.
    """
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fedhe_tenseal_tensors.proto", package="tenseal", syntax="proto3"
    )
    msg = fdp.message_type.add(name="CKKSVectorProto")
    f = descriptor_pb2.FieldDescriptorProto
    msg.field.add(name="sizes", number=1, type=f.TYPE_UINT32, label=f.LABEL_REPEATED)
    msg.field.add(name="ciphertexts", number=2, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    msg.field.add(name="scale", number=3, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tenseal.CKKSVectorProto"))


CKKSVectorProto = _ckks_vector_proto_class()


def wrap_vector(ciphertexts: Sequence[bytes], sizes: Sequence[int], scale: float) -> bytes:
    """SEAL-saved ciphertexts (one per chunk) -> bytes ``ts.ckks_vector_from`` accepts."""
    if len(ciphertexts) != len(sizes) or not ciphertexts:
        raise ChunkLayoutError(f"{len(ciphertexts)} ciphertexts for {len(sizes)} chunk sizes")
    return CKKSVectorProto(sizes=list(sizes), ciphertexts=list(ciphertexts), scale=scale).SerializeToString()


def unwrap_vector(data: bytes) -> tuple[list[int], list[bytes], float]:
    """TenSEAL CKKSVector bytes -> (chunk sizes, SEAL-saved ciphertexts, scale). No validation."""
    msg = CKKSVectorProto.FromString(data)
    return list(msg.sizes), list(msg.ciphertexts), msg.scale


def seal_bytes(obj: Any) -> bytes:
    """What SEAL's ``save`` writes (its default compression) for a ciphertext or serializable.

    Accepts ``sealapi`` objects and the SEAL objects TenSEAL hands out (``vec.ciphertext()``):
    pybind11 converts between the two bindings of the same C++ type.
    """
    fd, path = tempfile.mkstemp(prefix="fedhe-seal-", dir=SCRATCH_DIR)
    try:
        os.close(fd)
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def encrypt_seeded(context: ts.Context, values: np.ndarray, scale: float | None = None) -> bytes:
    """Seeded symmetric encryption of at most ``slots`` values, as TenSEAL CKKSVector bytes.

    Full depth and ``scale`` (default: the context's global scale, the profile's), so the result
    passes ``TensealBackend.deserialize(fresh=True)``. Short vectors are replicated across the
    slots exactly as TenSEAL's own encryption does, so both kinds of ciphertext mix freely.
    """
    if not context.has_secret_key():
        raise SecretKeyRequiredError(
            "seeded (symmetric) encryption needs the secret key: use the participant's key "
            "(participant.ctx), not an evaluation-only context such as the coordinator's"
        )
    flat = np.asarray(values, dtype=np.float64)
    seal_context = context.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_context)
    slots = encoder.slot_count()
    if flat.ndim != 1 or not 1 <= flat.size <= slots:
        raise ChunkLayoutError(f"expected a flat vector of 1..{slots} values, got shape {flat.shape}")
    if not np.all(np.isfinite(flat)):
        raise NonFiniteValueError(f"refusing to encrypt {int(np.count_nonzero(~np.isfinite(flat)))} NaN/inf values")
    scale = context.global_scale if scale is None else float(scale)
    plain = sealapi.Plaintext()
    encoder.encode(np.resize(flat, slots).tolist(), scale, plain)  # at the first (full-depth) level
    seeded = sealapi.Encryptor(seal_context, context.secret_key().data).encrypt_symmetric(plain)
    return wrap_vector([seal_bytes(seeded)], [flat.size], scale)


def level_parms_id(context: ts.Context, level: int) -> list[int]:
    """SEAL's parms_id of the data level ``level`` (0 = last, one prime)."""
    data = context.seal_context().data.first_context_data()
    top = data.chain_index()
    if not 0 <= level <= top:
        raise LevelError(f"level {level} is outside this context's 0..{top}")
    while data.chain_index() != level:
        data = data.next_context_data()
    return data.parms_id()


def switch_to_level(context: ts.Context, vec: ts.CKKSVector | bytes, level: int) -> bytes:
    """Modulus-switch every chunk of ``vec`` down to ``level`` and serialize it (no secret key).

    Pick the lowest level the receiver still needs (0 if it only decrypts): each dropped prime
    shrinks the bytes. ``vec`` itself is left unchanged. Raises ``LevelError`` for a level above
    the ciphertext's (a modulus switch cannot add primes).

    TenSEAL's Python API exposes neither a vector's chunk sizes nor its encoding scale (the
    ``scale()`` wrapper is broken in 0.3.18), and serializing just to read them would cost what
    this saves. So bytes keep theirs; a ``CKKSVector`` is taken to be chunked as TenSEAL encrypts
    (full chunks of ``slots`` values in order) at the context's global scale, as every vector in
    fedhe-rl is.
    """
    if isinstance(vec, bytes | bytearray | memoryview):
        sizes, _, scale = unwrap_vector(bytes(vec))
        vec = ts.ckks_vector_from(context, bytes(vec))
    else:
        sizes, scale = [], context.global_scale
    parms_id = level_parms_id(context, level)
    evaluator = sealapi.Evaluator(context.seal_context().data)
    cts = vec.ciphertext()  # copies: switching them leaves ``vec`` intact
    saved = []
    for ct in cts:
        if ct.coeff_modulus_size() - 1 < level:
            raise LevelError(f"ciphertext is at level {ct.coeff_modulus_size() - 1}; cannot switch up to {level}")
        evaluator.mod_switch_to_inplace(ct, parms_id)
        saved.append(seal_bytes(ct))
    if not sizes:
        slots = context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
        sizes = [min(slots, vec.size() - i * slots) for i in range(len(cts))]
    return wrap_vector(saved, sizes, scale)


def switch_to_last(context: ts.Context, vec: ts.CKKSVector | bytes) -> bytes:
    """``switch_to_level(context, vec, 0)``: for a receiver that only decrypts."""
    return switch_to_level(context, vec, 0)

"""Codec: vectors of any length round-trip; every kind of bad input gets a typed error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.wire_bytes import decode_vector, encode_vector
from participant.keyholder import PlainKeyHolder, decrypt_vector, load_keyholder
from protos import messages
from protos.backend import PlainBackend
from protos.codec import chunk_count, encrypt_vector
from protos.errors import (
    ChunkLayoutError,
    FingerprintMismatchError,
    InvalidCiphertextError,
    MalformedMessageError,
    NonFiniteValueError,
    PayloadTooLargeError,
    ProfileMismatchError,
    UnsupportedVersionError,
)
from protos.fedhe.v1 import wire_pb2
from protos.profiles import get_profile


@pytest.mark.parametrize("length", [1, 7, 4096, 4097, 9000])
def test_roundtrip_uses_fewest_chunks(small_holder, small_coordinator, length):
    values = np.random.default_rng(length).normal(size=length)
    data = encode_vector(small_holder, encrypt_vector(small_holder, values))
    msg = wire_pb2.EncryptedVector.FromString(data)
    assert len(msg.chunks) == chunk_count(length, 4096) == -(-length // 4096)
    at_coordinator = decode_vector(small_coordinator, data, expected_length=length)
    back = decode_vector(small_holder, encode_vector(small_coordinator, at_coordinator))
    np.testing.assert_allclose(decrypt_vector(small_holder, back), values, atol=1e-6)


def _valid(holder, length=10) -> wire_pb2.EncryptedVector:
    return wire_pb2.EncryptedVector.FromString(
        encode_vector(holder, encrypt_vector(holder, np.ones(length)))
    )


def test_wrong_key_fingerprint(small_holder, other_keys):
    foreign = load_keyholder(other_keys)
    data = encode_vector(foreign, encrypt_vector(foreign, np.ones(3)))
    with pytest.raises(FingerprintMismatchError, match="fingerprint.txt"):
        decode_vector(small_holder, data)


def test_wrong_profile(small_holder):
    msg = _valid(small_holder)
    msg.he_profile = "n16k-d6"
    with pytest.raises(ProfileMismatchError):
        decode_vector(small_holder, msg.SerializeToString())


def test_unknown_protocol_version(small_holder):
    msg = _valid(small_holder)
    msg.protocol_version = 99
    with pytest.raises(UnsupportedVersionError, match="Upgrade"):
        decode_vector(small_holder, msg.SerializeToString())


@pytest.mark.parametrize("field, value", [("length", 5000), ("length", 0), ("slots_per_chunk", 8)])
def test_layout_mismatch(small_holder, field, value):
    msg = _valid(small_holder)
    setattr(msg, field, value)
    with pytest.raises(ChunkLayoutError):
        decode_vector(small_holder, msg.SerializeToString())


def test_extra_chunk(small_holder):
    msg = _valid(small_holder)
    msg.chunks.append(msg.chunks[0])
    with pytest.raises(ChunkLayoutError, match="chunks"):
        decode_vector(small_holder, msg.SerializeToString())


def test_expected_length_is_enforced(small_holder):
    with pytest.raises(ChunkLayoutError, match="expected 11"):
        decode_vector(small_holder, _valid(small_holder).SerializeToString(), expected_length=11)


def test_truncated_message(small_holder):
    data = _valid(small_holder).SerializeToString()
    with pytest.raises((MalformedMessageError, InvalidCiphertextError)):
        decode_vector(small_holder, data[: len(data) - 1000])


def test_garbage_chunk(small_holder):
    msg = _valid(small_holder)
    msg.chunks[0] = b"\x00" * 1000
    with pytest.raises(InvalidCiphertextError, match="not a valid CKKS"):
        decode_vector(small_holder, msg.SerializeToString())


def test_garbage_bytes(small_holder):
    with pytest.raises(MalformedMessageError):
        decode_vector(small_holder, b"\xff\xfe" * 50)


def test_oversized_payload_rejected_before_parsing(small_holder):
    data = _valid(small_holder).SerializeToString()
    with pytest.raises(PayloadTooLargeError, match="exceeds"):
        decode_vector(small_holder, data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadTooLargeError):
        decode_vector(small_holder, data + b"\x00" * (20 << 20), expected_length=10)


def test_nan_is_refused_before_encryption(small_holder):
    with pytest.raises(NonFiniteValueError, match="NaN"):
        encrypt_vector(small_holder, np.array([1.0, np.nan]))


def test_full_depth_is_enforced_for_updates(holder, coordinator_backend):
    vec = decode_vector(coordinator_backend, encode_vector(holder, encrypt_vector(holder, np.ones(4))))
    low = type(vec)([coordinator_backend.mul_scalar(vec.chunks[0], 1.0)], 4)
    data = encode_vector(coordinator_backend, low)
    decode_vector(holder, data)  # fine as a reply
    with pytest.raises(InvalidCiphertextError, match="full depth"):
        decode_vector(holder, data, fresh=True)


def test_plaintext_baseline_uses_the_same_layout():
    profile = get_profile("n8k-d2")
    holder = PlainKeyHolder(profile)
    values = np.arange(5000.0)
    data = encode_vector(holder, encrypt_vector(holder, values))
    msg = wire_pb2.EncryptedVector.FromString(data)
    assert len(msg.chunks) == 2 and msg.encoding == wire_pb2.ENCODING_PLAIN_F64
    np.testing.assert_array_equal(decrypt_vector(holder, decode_vector(PlainBackend(profile), data)), values)


def test_plaintext_and_encrypted_messages_do_not_mix(small_holder):
    plain = PlainKeyHolder(get_profile("n8k-d2"))
    data = encode_vector(plain, encrypt_vector(plain, np.ones(3)))
    with pytest.raises((FingerprintMismatchError, ProfileMismatchError)):
        decode_vector(small_holder, data)


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_a_detached_part_does_not_keep_its_parsed_message_alive():
    """A kept part of a parsed message pins the whole message (one arena): 100 kept parts of 4 MB
    replies would hold 400 MB. The coordinator keeps each masked update's masking metadata (its
    sealed shares) until the round's unmask exchange, and each survivor's opened shares."""
    masking = wire_pb2.PairwiseMasking(participant_index=1, roster_size=3, members=[0, 1, 2], threshold=2,
                                       commitment=os.urandom(32), shares=[
                                           wire_pb2.SealedShare(sender=1, recipient=j, nonce=os.urandom(12),
                                                                ciphertext=os.urandom(34)) for j in (0, 2)])
    update = wire_pb2.ParticipantUpdate(round=1, masking=masking)
    update.update.chunks.append(os.urandom(4_000_000))
    data = update.SerializeToString()
    before = _resident_mb()
    kept = [messages.detached(wire_pb2.ParticipantUpdate.FromString(data).masking) for _ in range(100)]
    assert _resident_mb() - before < 100
    assert all(k == masking for k in kept)

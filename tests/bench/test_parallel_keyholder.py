"""Key-holder work and encryption over worker processes (benchmarks only): same values as in-process,
errors still typed."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.parallel_encryption import encrypt_message
from benchmarks.parallel_keyholder import decrypt_message, keyholder_workers, reencrypt_message
from coordinator.chunk_workers import ChunkWorkers
from participant.keyholder import decrypt_vector
from protos.codec import encrypt_vector, from_proto, to_proto
from protos.errors import InvalidCiphertextError, NonFiniteValueError


@pytest.fixture(scope="module")
def workers(small_holder):
    with keyholder_workers(small_holder, workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def public_workers(small_coordinator):
    with ChunkWorkers(small_coordinator, workers=2) as pool:
        yield pool


def _values(holder, chunks: float = 2.5) -> np.ndarray:
    return np.random.default_rng(1).normal(size=int(chunks * holder.slots))


def test_decrypt_message_matches_decrypt_vector(workers, small_holder):
    values = _values(small_holder)
    msg = to_proto(small_holder, encrypt_vector(small_holder, values))
    got = decrypt_message(workers, msg, expected_length=values.size)
    np.testing.assert_array_equal(got, decrypt_vector(small_holder, from_proto(small_holder, msg)))
    assert workers._pool is not None


def test_reencrypt_message_is_fresh_and_keeps_the_values(workers, small_holder, small_coordinator):
    values = _values(small_holder)
    low = encrypt_vector(small_coordinator, values)
    low.chunks = [small_coordinator.mul_scalar(c, 1.0) for c in low.chunks]  # one level used
    fresh = reencrypt_message(workers, to_proto(small_coordinator, low), expected_length=values.size)
    vector = from_proto(small_coordinator, fresh, expected_length=values.size, fresh=True)  # full depth
    assert all(small_coordinator.levels_left(c) == small_coordinator.profile.levels for c in vector.chunks)
    np.testing.assert_allclose(decrypt_vector(small_holder, vector), values, atol=1e-6)


def test_encrypt_message_is_a_fresh_encryption(public_workers, small_holder, small_coordinator):
    values = _values(small_holder)
    msg = encrypt_message(public_workers, values)
    vector = from_proto(small_coordinator, msg, expected_length=values.size, fresh=True)
    np.testing.assert_allclose(decrypt_vector(small_holder, vector), values, atol=1e-6)
    with pytest.raises(NonFiniteValueError):
        encrypt_message(public_workers, np.array([1.0, np.nan]))


def test_a_worker_rejects_a_corrupt_chunk_with_the_usual_error(workers, small_holder):
    msg = to_proto(small_holder, encrypt_vector(small_holder, _values(small_holder)))
    msg.chunks[1] = msg.chunks[1][:100] + bytes(len(msg.chunks[1]) - 100)
    with pytest.raises(InvalidCiphertextError):
        reencrypt_message(workers, msg)
    with pytest.raises(InvalidCiphertextError):
        decrypt_message(workers, msg)

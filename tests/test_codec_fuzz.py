"""Fuzzing the decoder: random bytes and mutated valid messages only ever raise WireError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.codec import decode_vector, encode_vector, encrypt_vector
from protos.errors import WireError

FUZZ = settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def valid_message(small_holder) -> bytes:
    return encode_vector(small_holder, encrypt_vector(small_holder, np.linspace(-1, 1, 100)))


def _decode(backend, data: bytes) -> None:
    try:
        decode_vector(backend, data)
    except WireError:
        pass


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_wire_errors(small_coordinator, data):
    _decode(small_coordinator, data)


@FUZZ
@given(
    position=st.floats(0, 1, exclude_max=True),
    action=st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
    noise=st.binary(min_size=1, max_size=64),
)
def test_mutated_valid_messages_only_raise_wire_errors(small_coordinator, valid_message, position, action, noise):
    data = bytearray(valid_message)
    i = int(position * len(data))
    if action == "flip":
        data[i] ^= noise[0] or 1
    elif action == "truncate":
        del data[i:]
    elif action == "insert":
        data[i:i] = noise
    elif action == "delete":
        del data[i : i + len(noise)]
    else:
        data[i : i + len(noise)] = noise
    _decode(small_coordinator, bytes(data))

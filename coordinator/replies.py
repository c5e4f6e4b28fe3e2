"""Reading participants' replies: size limit first, then parsing, then every ciphertext.

Each reader raises ``WireError`` naming the problem, and the round loop records it as a failure
of that participant (``rounds.HEAdamCoordinator._exchange``). Every ciphertext a participant
sends must be fresh (full depth, exactly the profile's scale), so sums and HE-Adam can never fail
on a well-formed but hostile reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Message

from coordinator.he_adam import STATE_NAMES
from protos import messages
from protos.backend import HEBackend
from protos.codec import EncryptedVector, check_version, from_proto, max_bytes_for
from protos.errors import MalformedMessageError, WireError
from protos.fedhe.v1 import wire_pb2

HEADER_BYTES = 1024  # version, round, map keys and a ReleasedMetrics


@dataclass
class RefreshAnswer:
    theta: EncryptedVector | None
    state: dict[str, EncryptedVector]  # still masked
    released: wire_pb2.ReleasedMetrics | None


def update_limit(backend: HEBackend, num_params: int) -> int:
    return max_bytes_for(backend, num_params) + max_bytes_for(backend, messages.STATS_LENGTH) + HEADER_BYTES


def refresh_limit(backend: HEBackend, num_params: int) -> int:
    return max_bytes_for(backend, num_params, vectors=1 + len(STATE_NAMES)) + HEADER_BYTES


def norm_reply_limit(count: int) -> int:
    return HEADER_BYTES + 9 * count


def _check_round(what: str, version: int, got: int, expected: int) -> None:
    check_version(version, what)
    if got != expected:
        raise WireError(f"{what} is for round {got}, this is round {expected}")


def read_update(
    backend: HEBackend, reply: Message, round_: int, num_params: int
) -> tuple[EncryptedVector, EncryptedVector]:
    """The update and rollout-statistics ciphertexts of a train reply."""
    update = messages.unpack(reply.content, messages.UPDATE, wire_pb2.ParticipantUpdate,
                             max_bytes=update_limit(backend, num_params))
    _check_round("update", update.protocol_version, update.round, round_)
    vec = from_proto(backend, update.update, expected_length=num_params, fresh=True)
    stats = from_proto(backend, update.rollout_stats, expected_length=messages.STATS_LENGTH, fresh=True)
    return vec, stats


def read_refresh(
    backend: HEBackend, reply: Message, round_: int, num_params: int, state_names: tuple[str, ...]
) -> RefreshAnswer:
    """Fresh theta (if asked for) and the still-masked optimizer state ``state_names``."""
    answer = messages.unpack(reply.content, messages.REFRESH_REPLY, wire_pb2.RefreshReply,
                             max_bytes=refresh_limit(backend, num_params))
    _check_round("refresh reply", answer.protocol_version, answer.round, round_)
    if set(answer.state) != set(state_names):
        raise MalformedMessageError(f"refresh reply holds state {sorted(answer.state)}, expected {sorted(state_names)}")
    theta = (from_proto(backend, answer.theta, expected_length=num_params, fresh=True)
             if answer.HasField("theta") else None)
    state = {k: from_proto(backend, v, expected_length=num_params, fresh=True) for k, v in answer.state.items()}
    return RefreshAnswer(theta, state, answer.released if answer.HasField("released") else None)


def read_norms(reply: Message, round_: int, count: int) -> list[float]:
    """The key holder's rounded slot sums, one per masked ciphertext of the query."""
    answer = messages.unpack(reply.content, messages.NORM_REPLY, wire_pb2.NormReply,
                             max_bytes=norm_reply_limit(count))
    _check_round("norm reply", answer.protocol_version, answer.round, round_)
    if len(answer.masked_sums) != count:
        raise MalformedMessageError(f"norm reply holds {len(answer.masked_sums)} sums for {count} ciphertexts")
    if not all(math.isfinite(x) for x in answer.masked_sums):
        raise MalformedMessageError("norm reply holds NaN or infinite sums")
    return list(answer.masked_sums)

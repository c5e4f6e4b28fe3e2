"""Reading participants' replies: size limit first, then parsing, then every ciphertext.

Each reader raises ``WireError`` naming the problem, and the round loop records it as a failure
of that participant (``coordinator.exchange``). Every ciphertext a participant
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
    theta_tiled: EncryptedVector | None = None  # encrypted-rollout mode: theta in the block layout


@dataclass
class UpdateReply:
    update: EncryptedVector
    stats: EncryptedVector
    masking: wire_pb2.PairwiseMasking | None  # present iff the run masks


def update_limit(backend: HEBackend, num_params: int) -> int:
    return max_bytes_for(backend, num_params) + max_bytes_for(backend, messages.STATS_LENGTH) + HEADER_BYTES


def refresh_limit(backend: HEBackend, num_params: int, tiled_length: int = 0) -> int:
    tiled = max_bytes_for(backend, tiled_length) if tiled_length else 0
    return max_bytes_for(backend, num_params, vectors=1 + len(STATE_NAMES)) + tiled + HEADER_BYTES


def norm_reply_limit(count: int) -> int:
    return HEADER_BYTES + 9 * count


def _check_round(what: str, version: int, got: int, expected: int) -> None:
    check_version(version, what)
    if got != expected:
        raise WireError(f"{what} is for round {got}, this is round {expected}")


def read_update(backend: HEBackend, reply: Message, round_: int, num_params: int, masked: bool) -> UpdateReply:
    """The update and rollout-statistics ciphertexts of a train reply (and its masking metadata)."""
    update = messages.unpack(reply.content, messages.UPDATE, wire_pb2.ParticipantUpdate,
                             max_bytes=update_limit(backend, num_params))
    _check_round("update", update.protocol_version, update.round, round_)
    if update.HasField("masking") != masked:
        raise MalformedMessageError(
            "update carries no pairwise masks but this run uses masking pairwise" if masked else
            "update carries pairwise masks but this run has masking off"
        )
    vec = from_proto(backend, update.update, expected_length=num_params, fresh=True)
    stats = from_proto(backend, update.rollout_stats, expected_length=messages.STATS_LENGTH, fresh=True)
    return UpdateReply(vec, stats, messages.detached(update.masking) if masked else None)


def read_unmask(backend: HEBackend, reply: Message, round_: int, num_params: int, corrections: bool,
                max_shares: int) -> tuple[list[wire_pb2.RevealedShare], tuple[EncryptedVector, EncryptedVector] | None]:
    """A survivor's opened shares and, when members are missing, its encrypted mask corrections."""
    limit = update_limit(backend, num_params) + HEADER_BYTES + 64 * max_shares
    answer = messages.unpack(reply.content, messages.UNMASK_REPLY, wire_pb2.UnmaskReply, max_bytes=limit)
    _check_round("unmask reply", answer.protocol_version, answer.round, round_)
    if len(answer.shares) > max_shares or any(len(share.share) != 16 for share in answer.shares):
        raise MalformedMessageError(f"unmask reply holds {len(answer.shares)} shares, at most {max_shares} of 16 bytes")
    if answer.HasField("update") != corrections or answer.HasField("rollout_stats") != corrections:
        raise MalformedMessageError("unmask reply lacks its mask corrections" if corrections else
                                    "unmask reply carries corrections nobody asked for")
    shares = [messages.detached(share) for share in answer.shares]
    if not corrections:
        return shares, None
    vec = from_proto(backend, answer.update, expected_length=num_params, fresh=True)
    stats = from_proto(backend, answer.rollout_stats, expected_length=messages.STATS_LENGTH, fresh=True)
    return shares, (vec, stats)


def read_integrity(reply: Message, round_: int) -> wire_pb2.IntegrityReply:
    """A key holder's verdict on the aggregate's bound and the statistics, plus their rounded release."""
    answer = messages.unpack(reply.content, messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply,
                             max_bytes=HEADER_BYTES)
    _check_round("integrity reply", answer.protocol_version, answer.round, round_)
    if answer.HasField("released") and answer.released.round != round_:
        raise MalformedMessageError(f"integrity reply releases round {answer.released.round} in round {round_}")
    return answer


def read_refresh(
    backend: HEBackend, reply: Message, round_: int, num_params: int, state_names: tuple[str, ...],
    tiled_length: int = 0, want_theta: bool = False,
) -> RefreshAnswer:
    """Fresh theta (``want_theta``: only before round 1, when the coordinator holds none), the
    still-masked optimizer state ``state_names`` and, in the encrypted-rollout mode
    (``tiled_length`` > 0), theta in the block layout."""
    answer = messages.unpack(reply.content, messages.REFRESH_REPLY, wire_pb2.RefreshReply,
                             max_bytes=refresh_limit(backend, num_params, tiled_length))
    _check_round("refresh reply", answer.protocol_version, answer.round, round_)
    if set(answer.state) != set(state_names):
        raise MalformedMessageError(f"refresh reply holds state {sorted(answer.state)}, expected {sorted(state_names)}")
    if answer.HasField("theta") != want_theta:
        raise MalformedMessageError("refresh reply lacks theta" if want_theta else
                                    "refresh reply carries a theta the coordinator did not ask for")
    theta = from_proto(backend, answer.theta, expected_length=num_params, fresh=True) if want_theta else None
    state = {k: from_proto(backend, v, expected_length=num_params, fresh=True) for k, v in answer.state.items()}
    tiled = None
    if tiled_length:
        if not answer.HasField("theta_tiled"):
            raise MalformedMessageError("refresh reply lacks the tiled theta this mode needs")
        tiled = from_proto(backend, answer.theta_tiled, expected_length=tiled_length, fresh=True)
    return RefreshAnswer(theta, state, tiled)


def read_rollout(
    backend: HEBackend, reply: Message, round_: int, block_length: int, blocks: int, theta_length: int
) -> tuple[list[EncryptedVector], EncryptedVector]:
    """An owner's encrypted blocks (exactly ``blocks``, each ``block_length`` values) and tiled theta,
    all under ``backend``, the owner's own key."""
    limit = max_bytes_for(backend, block_length, vectors=blocks) + max_bytes_for(backend, theta_length)
    upload = messages.unpack(reply.content, messages.ROLLOUT, wire_pb2.RolloutUpload, max_bytes=limit + HEADER_BYTES)
    _check_round("rollout upload", upload.protocol_version, upload.round, round_)
    if len(upload.blocks) != blocks:
        raise MalformedMessageError(f"rollout upload holds {len(upload.blocks)} blocks, every owner sends {blocks}")
    vectors = [from_proto(backend, b, expected_length=block_length, fresh=True) for b in upload.blocks]
    theta = from_proto(backend, upload.theta_tiled, expected_length=theta_length, fresh=True)
    return vectors, theta


def read_gradient(backend: HEBackend, reply: Message, round_: int, num_params: int) -> EncryptedVector:
    """The key holder's collapsed, re-encrypted gradient (still offset by the collapsed masks)."""
    answer = messages.unpack(reply.content, messages.GRADIENT_REPLY, wire_pb2.GradientReply,
                             max_bytes=max_bytes_for(backend, num_params) + HEADER_BYTES)
    _check_round("gradient reply", answer.protocol_version, answer.round, round_)
    return from_proto(backend, answer.gradient, expected_length=num_params, fresh=True)


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

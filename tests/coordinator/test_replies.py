"""The coordinator reads replies strictly: each bad one is a recorded failure of its sender."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Error, Message, Metadata, RecordDict

from coordinator.replies import read_norms, read_update, update_limit
from coordinator.rounds import HEAdamCoordinator, RoundOutcome, RoundSums
from participant.keyholder import TensealKeyHolder, decrypt_vector, load_keyholder
from protos import messages
from protos.codec import PROTOCOL_VERSION, EncryptedVector, encrypt_vector, to_proto
from protos.errors import PayloadTooLargeError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import HEAdamConfig

N = 20


@pytest.fixture()
def coordinator(coordinator_backend, tmp_path):
    return HEAdamCoordinator(coordinator_backend, HEAdamConfig(), "test", N, tmp_path)


def reply_from(content: RecordDict, node: int = 7) -> Message:
    """A reply as the coordinator receives it from node ``node``."""
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="q1",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content, metadata=metadata)


def update_msg(holder, round_=1, values=None, stats=None) -> wire_pb2.ParticipantUpdate:
    values = np.ones(N) if values is None else values
    return wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION,
        round=round_,
        update=to_proto(holder, encrypt_vector(holder, values)),
        rollout_stats=to_proto(holder, encrypt_vector(holder, np.array([10.0, 2.0, 50.0] if stats is None else stats))),
    )


def content_of(update: wire_pb2.ParticipantUpdate) -> RecordDict:
    return RecordDict({messages.UPDATE: messages.pack(update)})


def rejected(coordinator: HEAdamCoordinator, reply: Message) -> str:
    """Run the reply through the coordinator's guarded reader; it must become a recorded failure."""
    outcome, sums = RoundOutcome(1), RoundSums(coordinator.backend)
    read = lambda r: sums.add(*read_update(coordinator.backend, r, 1, N))  # noqa: E731
    if reply.has_error():
        outcome.fail(reply.metadata.src_node_id, reply.error.reason)
    else:
        coordinator._guarded(outcome, reply.metadata.src_node_id, "update", lambda: read(reply))
    assert sums.count == 0 and len(outcome.failed) == 1
    return outcome.failed[0]


def test_valid_updates_are_summed(coordinator, holder):
    sums = RoundSums(coordinator.backend)
    for k in range(3):
        sums.add(
            *read_update(
                coordinator.backend, reply_from(content_of(update_msg(holder, values=np.full(N, k + 1.0)))), 1, N
            )
        )
    np.testing.assert_allclose(decrypt_vector(holder, sums.update), np.full(N, 6.0), atol=1e-5)
    np.testing.assert_allclose(decrypt_vector(holder, sums.stats), [30.0, 6.0, 150.0], atol=1e-4)


def test_update_for_another_round(coordinator, holder):
    assert "round 5" in rejected(coordinator, reply_from(content_of(update_msg(holder, round_=5))))


def test_update_of_another_protocol_version_says_so(coordinator, holder):
    update = update_msg(holder)
    update.protocol_version = 9
    assert "protocol version 9" in rejected(coordinator, reply_from(content_of(update)))


def test_update_with_wrong_size(coordinator, holder):
    assert "expected 20" in rejected(coordinator, reply_from(content_of(update_msg(holder, values=np.ones(N + 1)))))


def test_update_under_another_key(coordinator, other_keys):
    foreign = load_keyholder(other_keys)
    assert "fingerprint" in rejected(coordinator, reply_from(content_of(update_msg(foreign))))


def test_garbage_update(coordinator):
    content = RecordDict({messages.UPDATE: messages.pack(wire_pb2.EncryptedVector())})
    assert "rejected update" in rejected(coordinator, reply_from(content))


def test_update_not_at_full_depth(coordinator, holder):
    update = update_msg(holder)
    vec = read_update(coordinator.backend, reply_from(content_of(update)), 1, N)[0]
    low = EncryptedVector([coordinator.backend.mul_scalar(vec.chunks[0], 1.0)], N)
    update.update.CopyFrom(to_proto(coordinator.backend, low))
    assert "full depth" in rejected(coordinator, reply_from(content_of(update)))


def off_scale_holder(holder: TensealKeyHolder) -> TensealKeyHolder:
    """The federation's own key, encrypting at 1.5 x 2^40: well-formed, hostile."""
    context = ts.context_from(holder.context.serialize(save_secret_key=True))
    context.global_scale = 1.5 * 2.0**40
    return TensealKeyHolder(context, holder.profile, holder.fingerprint)


@pytest.mark.parametrize("field", ["update", "rollout_stats"])
def test_off_scale_ciphertext_is_refused_before_summing(coordinator, holder, field):
    hostile = update_msg(holder)
    getattr(hostile, field).CopyFrom(update_msg(off_scale_holder(holder)).__getattribute__(field))
    sums = RoundSums(coordinator.backend)
    sums.add(*read_update(coordinator.backend, reply_from(content_of(update_msg(holder))), 1, N))
    assert "scale" in rejected(coordinator, reply_from(content_of(hostile)))


def test_error_reply(coordinator):
    reply = Message(Error(code=0, reason="simulator crashed"), metadata=reply_from(RecordDict()).metadata)
    assert "simulator crashed" in rejected(coordinator, reply)


def test_oversized_update_is_refused_before_parsing(coordinator, holder, monkeypatch):
    """Right chunk count, 68 MB: refused on its size, before protobuf or TenSEAL see it."""
    update = update_msg(holder)
    update.update.chunks[0] = b"\0" * (68 << 20)
    parsed = []
    monkeypatch.setattr(wire_pb2.ParticipantUpdate, "ParseFromString", lambda self, data: parsed.append(1))
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit"):
        read_update(coordinator.backend, reply_from(content_of(update)), 1, N)
    assert not parsed
    assert update_limit(coordinator.backend, N) < 4 << 20


def test_norm_reply_with_nan_is_refused():
    reply = wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=1, masked_sums=[1.0, float("nan")])
    with pytest.raises(WireError, match="NaN"):
        read_norms(reply_from(RecordDict({messages.NORM_REPLY: messages.pack(reply)})), 1, 2)


@pytest.mark.parametrize(
    "masking, expected",
    [
        (wire_pb2.PairwiseMasking(participant_index=0, roster_size=3), "already answered this round"),
        (wire_pb2.PairwiseMasking(participant_index=1, roster_size=4), "participants hold different rosters"),
        (wire_pb2.PairwiseMasking(participant_index=3, roster_size=3), "roster index 3 of a roster of 3"),
        (None, "carries no pairwise masks"),
    ],
)
def test_a_masked_round_admits_each_roster_member_once_over_one_roster(coordinator, holder, masking, expected):
    from coordinator.unmasking import MaskedRound

    masked = MaskedRound()
    masked.admit(3, wire_pb2.PairwiseMasking(participant_index=0, roster_size=3))
    update = update_msg(holder)
    if masking is not None:
        update.masking.CopyFrom(masking)
    with pytest.raises(WireError, match=expected):
        read_update(coordinator.backend, reply_from(content_of(update)), 1, N, masked)
    assert masked.nodes == {0: 3} and masked.dropped == [1, 2]


def test_a_masked_update_in_a_round_without_masking_is_refused(coordinator, holder):
    update = update_msg(holder)
    update.masking.CopyFrom(wire_pb2.PairwiseMasking(participant_index=0, roster_size=3))
    assert "masking off" in rejected(coordinator, reply_from(content_of(update)))

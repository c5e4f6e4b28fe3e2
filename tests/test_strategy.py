"""The coordinator rejects bad replies with a clear reason and keeps the round going."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata, RecordDict

from coordinator.strategy import HEAdamStrategy, StreamingSum
from participant.keyholder import decrypt_vector, load_keyholder
from protos import messages
from protos.codec import PROTOCOL_VERSION, decode_vector, encode_vector, encrypt_vector, to_proto
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import HEAdamConfig

N = 20


@pytest.fixture()
def strategy(coordinator_backend, tmp_path):
    return HEAdamStrategy(coordinator_backend, HEAdamConfig(), "test", N, tmp_path)


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id="m1", src_node_id=node, dst_node_id=0, reply_to_message_id="q1",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")


def _reply(content: RecordDict, node: int = 7) -> Message:
    """A reply as the coordinator receives it from node ``node``."""
    return Message(content, metadata=_metadata(node))


def _update(holder, round_=1, values=None, stats=None) -> wire_pb2.ParticipantUpdate:
    values = np.ones(N) if values is None else values
    return wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION, round=round_,
        update=to_proto(holder, encrypt_vector(holder, values)),
        rollout_stats=to_proto(holder, encrypt_vector(holder, np.array([10.0, 2.0, 50.0] if stats is None else stats))),
    )


def _content(update: wire_pb2.ParticipantUpdate) -> RecordDict:
    return RecordDict({messages.UPDATE: messages.pack(update)})


def test_valid_updates_are_summed(strategy, holder):
    updates, stats = StreamingSum(strategy.backend), StreamingSum(strategy.backend)
    for k in range(3):
        assert strategy._add_update(1, _reply(_content(_update(holder, values=np.full(N, k + 1.0)))), updates, stats, [])
    back = lambda v: decode_vector(holder, encode_vector(strategy.backend, v))
    np.testing.assert_allclose(decrypt_vector(holder, back(updates.total)), np.full(N, 6.0), atol=1e-5)
    np.testing.assert_allclose(decrypt_vector(holder, back(stats.total)), [30.0, 6.0, 150.0], atol=1e-4)


def _rejected(strategy, reply: Message) -> str:
    failed: list[str] = []
    updates, stats = StreamingSum(strategy.backend), StreamingSum(strategy.backend)
    assert not strategy._add_update(1, reply, updates, stats, failed)
    assert updates.count == 0 and len(failed) == 1
    return failed[0]


def test_update_for_another_round(strategy, holder):
    assert "round 5" in _rejected(strategy, _reply(_content(_update(holder, round_=5))))


def test_update_with_wrong_size(strategy, holder):
    assert "expected 20" in _rejected(strategy, _reply(_content(_update(holder, values=np.ones(N + 1)))))


def test_update_under_another_key(strategy, other_keys):
    foreign = load_keyholder(other_keys)
    assert "fingerprint" in _rejected(strategy, _reply(_content(_update(foreign))))


def test_garbage_update(strategy):
    content = RecordDict({messages.UPDATE: messages.pack(wire_pb2.EncryptedVector())})
    assert "rejected update" in _rejected(strategy, _reply(content))


def test_update_not_at_full_depth(strategy, holder):
    update = _update(holder)
    vec = decode_vector(strategy.backend, update.update.SerializeToString())
    low = type(vec)([strategy.backend.mul_scalar(vec.chunks[0], 1.0)], N)
    update.update.CopyFrom(to_proto(strategy.backend, low))
    assert "full depth" in _rejected(strategy, _reply(_content(update)))


def test_error_reply(strategy):
    reply = Message(Error(code=0, reason="simulator crashed"), metadata=_metadata(3))
    assert "simulator crashed" in _rejected(strategy, reply)


def test_oversized_update_is_refused(strategy, holder):
    update = _update(holder)
    update.update.chunks.append(b"\0" * (4 << 20))
    assert "chunks" in _rejected(strategy, _reply(_content(update)))

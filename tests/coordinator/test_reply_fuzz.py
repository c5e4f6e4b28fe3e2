"""Fuzzing the coordinator's reply handlers with structure-aware mutations of valid replies.

Random bytes mostly exercise protobuf's parser; these inputs are well-formed protobuf built from
real replies with fields, chunks and ciphertexts mutated, so every one reaches the project's own
checks (size limits, versions, rounds, fingerprints, layouts, ciphertext depth and scale). Each
must end as a ``WireError`` (a recorded failure of its sender) or be accepted as valid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Message, Metadata, RecordDict

from coordinator.aggregation import RoundContext
from coordinator.aggregation.masked_sum import PairwiseMaskedSum
from coordinator.exchange import RoundOutcome
from coordinator.replies import read_integrity, read_norms, read_refresh, read_unmask, read_update
from participant.keyholder import TensealKeyHolder, load_keyholder
from protos import messages
from protos.codec import PROTOCOL_VERSION, chunk_byte_limit, encrypt_vector, to_proto
from protos.errors import MalformedMessageError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import STATE_NAMES

pytestmark = pytest.mark.slow
D, ROUND = 50, 3


def as_reply(record: str, proto) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=5, dst_node_id=0, reply_to_message_id="q",
                        group_id="3", created_at=0.0, ttl=60.0, message_type="train")
    return Message(RecordDict({record: messages.pack(proto)}), metadata=metadata)


class Mutator:
    """Field-level mutations; chunks are replaced by ciphertext-shaped hostile variants."""

    def __init__(self, holder: TensealKeyHolder, foreign: TensealKeyHolder, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        valid = holder.serialize(holder.encrypt(np.ones(holder.slots)))
        off_ctx = ts.context_from(holder.context.serialize(save_secret_key=True))
        off_ctx.global_scale = 1.5 * 2.0**holder.profile.scale_bits
        self.chunks = {
            "off-scale": ts.ckks_vector(off_ctx, np.ones(holder.slots)).serialize(),
            "low-level": (holder.encrypt(np.ones(holder.slots)) * 2.0).serialize(),
            "foreign-key": foreign.serialize(foreign.encrypt(np.ones(foreign.slots))),
            "oversized": valid + bytes(chunk_byte_limit(holder)),
            "empty": b"",
        }
        self.valid = valid

    def pick(self, values: list):
        return values[int(self.rng.integers(0, len(values)))]

    def bytes_(self, n: int) -> bytes:
        return self.rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()

    def chunk(self, data: bytes) -> bytes:
        kind = self.rng.integers(0, 9)
        if kind < len(self.chunks):
            return list(self.chunks.values())[kind]
        if not data:
            return self.bytes_(self.rng.integers(1, 4096))
        data = bytearray(data)
        i = int(self.rng.integers(0, len(data)))
        if kind == 5:
            data[i] ^= int(self.rng.integers(1, 256))
        elif kind == 6:
            del data[i:]
        elif kind == 7:
            data[i:i] = self.bytes_(self.rng.integers(1, 64))
        else:
            return self.bytes_(self.rng.integers(1, 4096))
        return bytes(data)

    def vector(self, vec: wire_pb2.EncryptedVector) -> None:
        field = self.rng.integers(0, 9)
        if field == 0:
            vec.protocol_version = int(self.rng.integers(0, 4))
        elif field == 1:
            vec.key_fingerprint = self.bytes_(16).hex()[: int(self.rng.integers(0, 33))]
        elif field == 2:
            vec.he_profile = str(self.rng.choice(["n8k-d2", "n16k-d6", "", "x" * 40]))
        elif field == 3:
            vec.length = self.pick([0, 1, vec.length - 1, vec.length + 1, 2**40, 2**64 - 1])
        elif field == 4:
            vec.slots_per_chunk = self.pick([0, 1, 4096, 8192, 2**31])
        elif field == 5:
            vec.encoding = int(self.rng.integers(0, 4))
        elif field == 6 and len(vec.chunks):
            del vec.chunks[int(self.rng.integers(0, len(vec.chunks)))]
        elif field == 7:
            vec.chunks.append(self.chunk(self.valid))
        elif len(vec.chunks):
            i = int(self.rng.integers(0, len(vec.chunks)))
            vec.chunks[i] = self.chunk(vec.chunks[i])

    def header(self, msg) -> None:
        if self.rng.integers(0, 2):
            msg.protocol_version = int(self.rng.integers(0, 3))
        else:
            msg.round = self.pick([0, ROUND - 1, ROUND, ROUND + 1, 2**63])


def fuzz(handler: Callable[[Message], object], make: Callable[[Mutator], Message], mutator: Mutator, n: int) -> Counter:
    outcomes: Counter = Counter()
    for _ in range(n):
        reply = make(mutator)
        try:
            handler(reply)
            outcomes["accepted"] += 1
        except MalformedMessageError as exc:
            outcomes["parse" if "not a valid" in str(exc) else "project-check"] += 1
        except WireError:
            outcomes["project-check"] += 1
    return outcomes


@pytest.fixture(scope="module")
def mutator(small_holder, other_keys) -> Mutator:
    return Mutator(small_holder, load_keyholder(other_keys), seed=0)


@pytest.fixture(scope="module")
def valid_update(small_holder) -> wire_pb2.ParticipantUpdate:
    return wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION, round=ROUND,
        update=to_proto(small_holder, encrypt_vector(small_holder, np.ones(D))),
        rollout_stats=to_proto(small_holder, encrypt_vector(small_holder, np.ones(messages.STATS_LENGTH))),
    )


def test_update_handler(small_coordinator, valid_update, mutator):
    def make(m: Mutator) -> Message:
        update = wire_pb2.ParticipantUpdate()
        update.CopyFrom(valid_update)
        for _ in range(int(m.rng.integers(1, 3))):
            target = m.rng.integers(0, 4)
            if target == 0:
                m.header(update)
            else:
                m.vector(update.update if target < 3 else update.rollout_stats)
        return as_reply(messages.UPDATE, update)

    outcomes = fuzz(lambda r: read_update(small_coordinator, r, ROUND, D, masked=False), make, mutator, 6000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 5000, outcomes


def masking(index: int, members=(0, 1, 2)) -> wire_pb2.PairwiseMasking:
    """Well-formed masking metadata of roster index ``index`` (share contents are not read on admission)."""
    shares = [wire_pb2.SealedShare(sender=index, recipient=j, nonce=bytes(12), ciphertext=bytes(34))
              for j in members if j != index]
    return wire_pb2.PairwiseMasking(participant_index=index, roster_size=3, members=list(members), threshold=2,
                                    commitment=bytes(32), shares=shares)


def test_masked_update_handler(small_coordinator, valid_update, mutator):
    """Pairwise masking: the masking metadata is mutated too; a reply admitted to the round is valid."""
    valid = wire_pb2.ParticipantUpdate()
    valid.CopyFrom(valid_update)
    valid.masking.CopyFrom(masking(1))

    def make(m: Mutator) -> Message:
        update = wire_pb2.ParticipantUpdate()
        update.CopyFrom(valid)
        target = m.rng.integers(0, 8)
        mask = update.masking
        if target == 0:
            m.header(update)
        elif target == 1:
            mask.participant_index = m.pick([0, 1, 2, 3, 2**32 - 1])
            mask.roster_size = m.pick([0, 1, 3, 4, 2**32 - 1])
        elif target == 2:
            mask.ClearField("members")
            mask.members.extend(m.pick([[0, 1, 2], [0, 1], [1, 2], [0, 1, 2, 3], [2, 1, 0], [0, 1, 1, 2], []]))
        elif target == 3:
            mask.threshold = m.pick([0, 1, 2, 3, 2**32 - 1])
        elif target == 4:
            share = mask.shares[int(m.rng.integers(0, len(mask.shares)))] if len(mask.shares) else None
            action = m.rng.integers(0, 4)
            if action == 0 and share is not None:
                mask.shares.remove(share)
            elif action == 1:
                mask.shares.add().CopyFrom(mask.shares[0])
            elif share is not None:
                setattr(share, "sender" if action == 2 else "recipient", m.pick([0, 1, 2, 3]))
        elif target == 5:
            update.ClearField("masking")
        else:
            m.vector(update.update if target == 6 else update.rollout_stats)
        return as_reply(messages.UPDATE, update)

    def read(reply: Message):
        # round ROUND over nodes 4, 5, 6 (roster indices 0, 1, 2); node 4's update is already in
        ctx = RoundContext(None, small_coordinator, None, ROUND, [4, 5, 6], {4: 0, 5: 1, 6: 2}, 4, RoundOutcome(ROUND))
        masked = PairwiseMaskedSum(ctx)
        masked.admit(4, read_update(small_coordinator, as_reply(messages.UPDATE, first), ROUND, D, masked=True))
        masked.admit(5, read_update(small_coordinator, reply, ROUND, D, masked=True))
        admitted = masked.survivors[1].masking  # accepted: admitted, consistent with the round
        assert sorted(masked.survivors) == [0, 1] and masked.roster_size == 3
        assert admitted.participant_index == 1 and list(admitted.members) == [0, 1, 2]
        assert admitted.threshold == 2 and sorted(s.recipient for s in admitted.shares) == [0, 2]

    first = wire_pb2.ParticipantUpdate()
    first.CopyFrom(valid_update)
    first.masking.CopyFrom(masking(0))
    outcomes = fuzz(read, make, mutator, 2000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 1500, outcomes


def test_unmask_handler(small_coordinator, valid_update, mutator):
    """A survivor's opened shares and corrections: every mutation ends as a WireError or a valid reply."""
    valid = wire_pb2.UnmaskReply(protocol_version=PROTOCOL_VERSION, round=ROUND, update=valid_update.update,
                                 rollout_stats=valid_update.rollout_stats,
                                 shares=[wire_pb2.RevealedShare(sender=j, x=1, share=bytes(16)) for j in (0, 2)])

    def make(m: Mutator) -> Message:
        answer = wire_pb2.UnmaskReply()
        answer.CopyFrom(valid)
        target = m.rng.integers(0, 5)
        if target == 0:
            m.header(answer)
        elif target == 1:
            action = m.rng.integers(0, 3)
            if action == 0:
                answer.shares.add(sender=3, x=2, share=bytes(16))
            elif action == 1:
                answer.shares[0].share = m.bytes_(m.pick([0, 15, 17, 1 << 10]))
            else:
                answer.ClearField("shares")
        elif target == 2:
            answer.ClearField(m.pick(["update", "rollout_stats"]))
        else:
            m.vector(answer.update if target == 3 else answer.rollout_stats)
        return as_reply(messages.UNMASK_REPLY, answer)

    def read(reply: Message):
        shares, corrections = read_unmask(small_coordinator, reply, ROUND, D, True, 2)
        assert len(shares) <= 2 and all(len(s.share) == 16 for s in shares) and corrections is not None

    outcomes = fuzz(read, make, mutator, 2000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 1500, outcomes


def test_integrity_handler(mutator):
    """A key holder's verdict and release: a reply for another round or releasing another round is refused."""
    valid = wire_pb2.IntegrityReply(protocol_version=PROTOCOL_VERSION, round=ROUND, within_bound=True,
                                    stats_plausible=True, released=wire_pb2.ReleasedMetrics(
                                        round=ROUND, mean_return=21.5, episodes=4, steps=86, valid=True))

    def make(m: Mutator) -> Message:
        answer = wire_pb2.IntegrityReply()
        answer.CopyFrom(valid)
        target = m.rng.integers(0, 4)
        if target < 2:
            m.header(answer)
        elif target == 2:
            answer.released.round = m.pick([0, ROUND - 1, ROUND + 1, 2**63])
        else:
            answer.released.round = m.pick([0, ROUND - 1, ROUND, 2**63])
            answer.within_bound = bool(m.rng.integers(0, 2))
        return as_reply(messages.INTEGRITY_REPLY, answer)

    def read(reply: Message):
        answer = read_integrity(reply, ROUND)
        assert answer.round == ROUND and answer.released.round == ROUND

    outcomes = fuzz(read, make, mutator, 2000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 1500, outcomes


def test_refresh_handler(small_coordinator, small_holder, mutator):
    valid = wire_pb2.RefreshReply(protocol_version=PROTOCOL_VERSION, round=ROUND,
                                  theta=to_proto(small_holder, encrypt_vector(small_holder, np.ones(D))))
    for name in STATE_NAMES:
        valid.state[name].CopyFrom(valid.theta)

    def make(m: Mutator) -> Message:
        reply = wire_pb2.RefreshReply()
        reply.CopyFrom(valid)
        target = m.rng.integers(0, 6)
        if target == 0:
            m.header(reply)
        elif target == 1:
            del reply.state[str(m.rng.choice(STATE_NAMES))]
        elif target == 2:
            reply.state["x"].CopyFrom(reply.theta)
        else:
            m.vector(reply.theta if target == 3 else reply.state[str(m.rng.choice(STATE_NAMES))])
        return as_reply(messages.REFRESH_REPLY, reply)

    outcomes = fuzz(lambda r: read_refresh(small_coordinator, r, ROUND, D, STATE_NAMES, want_theta=True), make,
                    mutator, 3000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 2500, outcomes


def test_norm_handler(mutator):
    def make(m: Mutator) -> Message:
        sums = [float(x) for x in m.rng.choice([1.0, np.nan, np.inf, -5.0, 1e300], size=m.rng.integers(0, 6))]
        reply = wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=ROUND, masked_sums=sums)
        if m.rng.integers(0, 2):
            m.header(reply)
        if m.rng.integers(0, 4) == 0:
            reply.masked_sums.extend([1.0] * 400)
        return as_reply(messages.NORM_REPLY, reply)

    outcomes = fuzz(lambda r: read_norms(r, ROUND, 3), make, mutator, 2000)
    assert outcomes["parse"] == 0 and outcomes["project-check"] >= 1500, outcomes

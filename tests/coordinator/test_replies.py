"""The coordinator reads replies strictly: each bad one is a recorded failure of its sender."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Error, Message, Metadata, RecordDict

from coordinator.aggregation import PlainSum, RoundContext
from coordinator.aggregation.masked_sum import PairwiseMaskedSum
from coordinator.driver import RoundDriver
from coordinator.exchange import Exchange, RoundOutcome
from coordinator.organizations import EXCLUDED
from coordinator.replies import read_integrity, read_norms, read_unmask, read_update, update_limit
from participant.keyholder import TensealKeyHolder, decrypt_vector, load_keyholder
from protos import messages
from protos.codec import PROTOCOL_VERSION, EncryptedVector, encrypt_vector, to_proto
from protos.errors import PayloadTooLargeError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.plan import resolve_plan
from protos.reply_errors import (
    ENVIRONMENT,
    KEY_FILES,
    NODE_CONFIG,
    PROTOCOL,
    REFUSED,
    RUN_SETTINGS,
    WITHHELD,
    WRONG_KEY,
)
from protos.settings import RunSettings

PLAN = resolve_plan(RunSettings(scenario="cartpole", masking="off"), 3)
N = PLAN.num_params
NODES = {7: 0, 8: 1, 9: 2}  # node -> roster index


@pytest.fixture()
def driver(coordinator_backend, tmp_path):
    driver = RoundDriver(PLAN, coordinator_backend, tmp_path)
    yield driver
    driver.checkpoints.close()
    driver.workers.close()


def round_context(driver: RoundDriver, round_: int = 1) -> RoundContext:
    """Round ``round_`` of the driver's run, over nodes 7, 8, 9 (roster indices 0, 1, 2)."""
    grid = SimpleNamespace(run=SimpleNamespace(run_id=1))  # replies are handed in directly, never pulled
    exchange = Exchange(grid, driver.backend, driver.organizations, timeout=1.0)
    for node, index in NODES.items():
        driver.organizations.identify(node, index, f"participant-{index}")
    return RoundContext(driver.plan, driver.backend, exchange, round_, list(NODES), dict(NODES), 7,
                        RoundOutcome(round_))


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


def rejected(driver: RoundDriver, reply: Message, aggregation=None) -> dict:
    """Run the reply through the driver as a round does; it must become one recorded failure."""
    aggregation = aggregation or PlainSum(round_context(driver))
    ctx, node = aggregation.ctx, reply.metadata.src_node_id
    taken = list(aggregation.contributors)
    if reply.has_error():
        ctx.exchange.error_reply(node, reply, ctx.outcome)
    else:
        assert driver.take(ctx, node, "update", lambda: aggregation.add(node, reply)) is None
    assert aggregation.contributors == taken and len(ctx.outcome.failed) == 1
    failure = ctx.outcome.failed[0]
    assert failure["organization"] == f"participant-{NODES[node]}"
    assert driver.organizations.summary()[failure["organization"]]["rounds_failed"] == 1
    return failure


def test_valid_updates_are_summed(driver, holder):
    aggregation = PlainSum(round_context(driver))
    for k, node in enumerate(NODES):
        aggregation.add(node, reply_from(content_of(update_msg(holder, values=np.full(N, k + 1.0))), node))
    aggregate = aggregation.finish()
    assert aggregate.contributors == 3 and aggregation.contributors == list(NODES)
    np.testing.assert_allclose(decrypt_vector(holder, aggregate.update), np.full(N, 6.0), atol=1e-5)
    np.testing.assert_allclose(decrypt_vector(holder, aggregate.stats), [30.0, 6.0, 150.0], atol=1e-4)


def test_update_for_another_round(driver, holder):
    failure = rejected(driver, reply_from(content_of(update_msg(holder, round_=5))))
    assert failure["category"] == "rejected" and "round 5" in failure["reason"]


def test_update_of_another_protocol_version_says_so(driver, holder):
    update = update_msg(holder)
    update.protocol_version = 9
    assert "protocol version 9" in rejected(driver, reply_from(content_of(update)))["reason"]


def test_update_with_wrong_size(driver, holder):
    failure = rejected(driver, reply_from(content_of(update_msg(holder, values=np.ones(N + 1)))))
    assert f"expected {N}" in failure["reason"]


def test_update_under_another_key(driver, other_keys):
    foreign = load_keyholder(other_keys)
    assert "fingerprint" in rejected(driver, reply_from(content_of(update_msg(foreign))))["reason"]


def test_garbage_update(driver):
    content = RecordDict({messages.UPDATE: messages.pack(wire_pb2.EncryptedVector())})
    assert "rejected update" in rejected(driver, reply_from(content))["reason"]


def test_update_not_at_full_depth(driver, holder):
    update = update_msg(holder)
    vec = read_update(driver.backend, reply_from(content_of(update)), 1, N, masked=False).update
    low = EncryptedVector([driver.backend.mul_scalar(vec.chunks[0], 1.0)], N)
    update.update.CopyFrom(to_proto(driver.backend, low))
    assert "full depth" in rejected(driver, reply_from(content_of(update)))["reason"]


def off_scale_holder(holder: TensealKeyHolder) -> TensealKeyHolder:
    """The federation's own key, encrypting at 1.5 x 2^40: well-formed, hostile."""
    context = ts.context_from(holder.context.serialize(save_secret_key=True))
    context.global_scale = 1.5 * 2.0**40
    return TensealKeyHolder(context, holder.profile, holder.fingerprint)


@pytest.mark.parametrize("field", ["update", "rollout_stats"])
def test_off_scale_ciphertext_is_refused_before_summing(driver, holder, field):
    hostile = update_msg(holder)
    getattr(hostile, field).CopyFrom(update_msg(off_scale_holder(holder)).__getattribute__(field))
    aggregation = PlainSum(round_context(driver))
    aggregation.add(8, reply_from(content_of(update_msg(holder)), 8))
    assert "scale" in rejected(driver, reply_from(content_of(hostile)), aggregation)["reason"]
    assert aggregation.contributors == [8]
    np.testing.assert_allclose(decrypt_vector(holder, aggregation.finish().update), np.ones(N), atol=1e-5)


def test_error_reply(driver):
    reply = Message(Error(code=0, reason="simulator crashed"), metadata=reply_from(RecordDict()).metadata)
    assert rejected(driver, reply) == {"organization": "participant-0", "category": "flower",
                                       "reason": "simulator crashed"}


@pytest.mark.parametrize("category", [ENVIRONMENT, PROTOCOL, WITHHELD], ids=lambda c: c.name)
def test_a_participants_error_reply_is_recorded_under_its_data_free_category(driver, category):
    reply = Message(Error(code=category.code, reason=category.reason("participant-0")),
                    metadata=reply_from(RecordDict()).metadata)
    assert rejected(driver, reply) == {"organization": "participant-0", "category": category.name,
                                       "reason": "participant-0: " + category.text}
    assert driver.organizations.of(7).status != EXCLUDED  # it may answer again next round


@pytest.mark.parametrize("category", [WRONG_KEY, KEY_FILES, REFUSED, NODE_CONFIG, RUN_SETTINGS],
                         ids=lambda c: c.name)
def test_a_node_that_would_fail_every_round_is_left_out(driver, category):
    reply = Message(Error(code=category.code, reason=category.reason("participant-0")),
                    metadata=reply_from(RecordDict()).metadata)
    failure = rejected(driver, reply)
    assert failure["category"] == category.name and "left out for the rest of this run" in failure["reason"]
    assert driver.organizations.of(7).status == EXCLUDED and driver.organizations.active(list(NODES)) == [8, 9]


def test_oversized_update_is_refused_before_parsing(driver, holder, monkeypatch):
    """Right chunk count, 68 MB: refused on its size, before protobuf or TenSEAL see it."""
    update = update_msg(holder)
    update.update.chunks[0] = b"\0" * (68 << 20)
    parsed = []
    monkeypatch.setattr(wire_pb2.ParticipantUpdate, "ParseFromString", lambda self, data: parsed.append(1))
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit"):
        read_update(driver.backend, reply_from(content_of(update)), 1, N, masked=False)
    assert not parsed
    assert update_limit(driver.backend, N) < 4 << 20


def test_norm_reply_with_nan_is_refused():
    reply = wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=1, masked_sums=[1.0, float("nan")])
    with pytest.raises(WireError, match="NaN"):
        read_norms(reply_from(RecordDict({messages.NORM_REPLY: messages.pack(reply)})), 1, 2)


# -- pairwise masking: what a masked update must carry --------------------------------------------------
def masking(index: int, members=(0, 1, 2), roster_size: int = 3, threshold: int = 2,
            sender: int | None = None) -> wire_pb2.PairwiseMasking:
    """Well-formed masking metadata of roster index ``index`` (the shares' contents are not read here)."""
    shares = [wire_pb2.SealedShare(sender=index if sender is None else sender, recipient=j, nonce=bytes(12),
                                   ciphertext=bytes(34)) for j in members if j != index]
    return wire_pb2.PairwiseMasking(participant_index=index, roster_size=roster_size, members=list(members),
                                    threshold=threshold, commitment=bytes(32), shares=shares)


@pytest.mark.parametrize(
    "metadata, expected",
    [
        (masking(0), "names roster index 0, the node identified as 1"),
        (masking(1, members=(0, 1, 2, 3), roster_size=4),
         r"masked over \[0, 1, 2, 3\], the round's set is \[0, 1, 2\]"),
        (masking(1, members=(1, 2)), r"masked over \[1, 2\]"),
        (masking(1, roster_size=4), "participants hold different rosters"),
        (masking(1, threshold=1), "self-mask threshold 1 for 2 other members"),
        (masking(1, threshold=3), "self-mask threshold 3 for 2 other members"),
        (masking(1, sender=2), "one sealed share for each other member"),
        (wire_pb2.PairwiseMasking(participant_index=1, roster_size=3, members=[0, 1, 2], threshold=2),
         "one sealed share for each other member"),
        (None, "carries no pairwise masks"),
    ],
)
def test_a_masked_round_admits_each_member_once_over_the_rounds_set(driver, holder, metadata, expected):
    """Node 8 identified as roster index 1; node 7 (index 0) is already in the sum."""
    aggregation = PairwiseMaskedSum(round_context(driver))
    assert aggregation.train_config() == {"members": [0, 1, 2]}
    first = update_msg(holder)
    first.masking.CopyFrom(masking(0))
    aggregation.add(7, reply_from(content_of(first), 7))
    update = update_msg(holder)
    if metadata is not None:
        update.masking.CopyFrom(metadata)
    failure = rejected(driver, reply_from(content_of(update), 8), aggregation)
    assert failure["category"] == "rejected" and re.search(expected, failure["reason"]), failure
    assert list(aggregation.survivors) == [0] and aggregation.survivors[0].node == 7
    assert aggregation.contributors == [7] and aggregation.roster_size == 3


def test_a_masked_update_in_a_round_without_masking_is_refused(driver, holder):
    update = update_msg(holder)
    update.masking.CopyFrom(masking(0))
    assert "masking off" in rejected(driver, reply_from(content_of(update)))["reason"]


def test_a_masked_sum_of_fewer_than_three_changes_nothing(driver, holder):
    aggregation = PairwiseMaskedSum(round_context(driver))
    for node, index in list(NODES.items())[:2]:
        update = update_msg(holder)
        update.masking.CopyFrom(masking(index))
        aggregation.add(node, reply_from(content_of(update), node))
    assert aggregation.finish() is None and "needs at least 3" in aggregation.ctx.outcome.cause


# -- the unmask and integrity replies -------------------------------------------------------------------
def unmask_reply(holder, shares: int = 2, corrections: bool = True, share_bytes: int = 16) -> Message:
    reply = wire_pb2.UnmaskReply(protocol_version=PROTOCOL_VERSION, round=1, shares=[
        wire_pb2.RevealedShare(sender=k + 1, x=1, share=bytes(share_bytes)) for k in range(shares)])
    if corrections:
        reply.update.CopyFrom(to_proto(holder, encrypt_vector(holder, np.ones(N))))
        reply.rollout_stats.CopyFrom(to_proto(holder, encrypt_vector(holder, np.ones(messages.STATS_LENGTH))))
    return reply_from(RecordDict({messages.UNMASK_REPLY: messages.pack(reply)}))


def test_an_unmask_reply_carries_shares_and_exactly_the_corrections_asked_for(coordinator_backend, holder):
    shares, corrections = read_unmask(coordinator_backend, unmask_reply(holder), 1, N, True, 2)
    assert [s.sender for s in shares] == [1, 2] and corrections[0].length == N
    assert read_unmask(coordinator_backend, unmask_reply(holder, corrections=False), 1, N, False, 2)[1] is None
    with pytest.raises(WireError, match="corrections nobody asked for"):
        read_unmask(coordinator_backend, unmask_reply(holder), 1, N, False, 2)
    with pytest.raises(WireError, match="lacks its mask corrections"):
        read_unmask(coordinator_backend, unmask_reply(holder, corrections=False), 1, N, True, 2)
    with pytest.raises(WireError, match="holds 3 shares, at most 2"):
        read_unmask(coordinator_backend, unmask_reply(holder, shares=3), 1, N, True, 2)
    with pytest.raises(WireError, match="of 16 bytes"):
        read_unmask(coordinator_backend, unmask_reply(holder, share_bytes=17), 1, N, True, 2)
    with pytest.raises(WireError, match="for round 1, this is round 2"):
        read_unmask(coordinator_backend, unmask_reply(holder), 2, N, True, 2)


def integrity_reply(round_: int = 4, released_round: int | None = 4) -> Message:
    reply = wire_pb2.IntegrityReply(protocol_version=PROTOCOL_VERSION, round=round_, within_bound=True,
                                    stats_plausible=True)
    if released_round is not None:
        reply.released.CopyFrom(wire_pb2.ReleasedMetrics(round=released_round, mean_return=21.5, episodes=4,
                                                          steps=86, valid=True))
    return reply_from(RecordDict({messages.INTEGRITY_REPLY: messages.pack(reply)}))


def test_an_integrity_reply_releases_only_its_own_rounds_statistics():
    answer = read_integrity(integrity_reply(), 4)
    assert answer.within_bound and answer.released.round == 4 and answer.released.mean_return == 21.5
    assert not read_integrity(integrity_reply(released_round=None), 4).HasField("released")
    with pytest.raises(WireError, match="releases round 3 in round 4"):
        read_integrity(integrity_reply(released_round=3), 4)
    with pytest.raises(WireError, match="for round 5, this is round 4"):
        read_integrity(integrity_reply(round_=5, released_round=5), 4)


# -- the integrity check of the last round, when the refresher's reply did not carry a verdict ----------
class RefusingGrid:
    """Every key holder refuses (its ledger already holds the check, or it fails); who was asked is recorded."""

    run = SimpleNamespace(run_id=1)

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.replies: dict[str, Message] = {}

    def push_messages(self, outgoing: list[Message]) -> list[str]:
        ids = []
        for msg in outgoing:
            mid = f"m{len(self.asked)}"
            self.asked.append(msg.metadata.dst_node_id)
            metadata = Metadata(run_id=1, message_id=mid + "r", src_node_id=msg.metadata.dst_node_id, dst_node_id=0,
                                reply_to_message_id=mid, group_id=msg.metadata.group_id, created_at=0.0, ttl=60.0,
                                message_type=msg.metadata.message_type)
            self.replies[mid] = Message(Error(PROTOCOL.code, PROTOCOL.reason("participant")), metadata=metadata)
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


@pytest.mark.usefixtures("server_task")
def test_a_refresher_already_sent_the_check_is_not_asked_it_again(driver):
    """Round 1's check rode on round 2's train message to the refresher (node 8), whose reply carried no
    verdict the coordinator took (its update was rejected, or training failed after it answered). The
    dedicated exchange should ask the other key holders, not the one that already has the check."""
    from coordinator.driver import Unverified

    grid = RefusingGrid()
    exchange = Exchange(grid, driver.backend, driver.organizations, timeout=1.0)
    for node, index in NODES.items():
        driver.organizations.identify(node, index, f"participant-{index}")
    ctx = RoundContext(driver.plan, driver.backend, exchange, 2, list(NODES), dict(NODES), 8, RoundOutcome(2))
    query = messages.pack(wire_pb2.IntegrityQuery(protocol_version=PROTOCOL_VERSION, round=1, contributors=3))
    driver.unverified = Unverified(1, query, None, {}, {}, 3, 3)
    assert driver.settle(ctx, None, asked=(ctx.refresher,)) is False  # as run_round settles: undone, nobody confirmed
    assert 8 not in grid.asked and sorted(grid.asked) == [7, 9]

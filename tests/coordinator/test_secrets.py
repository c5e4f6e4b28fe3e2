"""The coordinator's secrets, seen from the key holder that receives them (ingress tests).

Each test drives the real coordinator (the round driver, its aggregation paths and integrity
check) and decrypts what a key holder would receive with the federation's secret key.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata, RecordDict

import participant.node as node
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.aggregation import Aggregate, NormBound, RoundContext
from coordinator.checkpoint import load_checkpoint
from coordinator.driver import RoundDriver, Unverified
from coordinator.exchange import Exchange, RoundOutcome
from coordinator.he_adam import HEAdamState
from coordinator.integrity import ask_verdict, integrity_query
from participant.answer_rules import AnswerLedger, check_integrity_query, check_norm_query, check_refresh_request
from participant.keyholder import decrypt_vector
from participant.local_update import NodeIdentity
from protos import messages
from protos.codec import PROTOCOL_VERSION, encrypt_vector, from_proto, to_proto
from protos.errors import RequestRefusedError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND, STATE_NAMES
from protos.plan import resolve_plan
from protos.settings import RunSettings

PLAN = resolve_plan(RunSettings(scenario="cartpole", masking="off"), 3)
D = PLAN.num_params  # CartPole's policy size (835)
NODES = [11, 12, 13]
REFRESHER = 12
pytestmark = pytest.mark.usefixtures("server_task")


class RecordingGrid:
    """Flower's Grid in one process: records every message; every node answers with a data-free error,
    so the coordinator asks each key holder in turn and each one's copy is recorded."""

    run = SimpleNamespace(run_id=1)

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def push_messages(self, outgoing: list[Message]) -> list[str]:
        ids = []
        for msg in outgoing:
            mid = uuid.uuid4().hex
            metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=msg.metadata.dst_node_id,
                                dst_node_id=0, reply_to_message_id=mid, group_id=msg.metadata.group_id,
                                created_at=time.time(), ttl=60.0, message_type=msg.metadata.message_type)
            self.replies[mid] = Message(Error(1008, "participant: failed with an internal error"), metadata=metadata)
            self.sent.append(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def received(self, kind: str, record: str, cls):
        """What the first key holder asked received: (its node, the request)."""
        msg = next(m for m in self.sent if m.metadata.message_type == kind)
        return msg.metadata.dst_node_id, messages.unpack(msg.content, record, cls, max_bytes=1 << 30)


@pytest.fixture()
def state_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "theta": rng.normal(0, 0.3, D),
        "m": rng.normal(0, 0.5, D),
        "z": 1 + rng.random(D),
        "w": 0.5 + 0.5 * rng.random(D),
    }


def encrypted(backend, holder, values: np.ndarray):
    """``values`` as the coordinator holds them: encrypted by a key holder, read back with the evaluation key."""
    return decode_vector(backend, encode_vector(holder, encrypt_vector(holder, values)))


def driver_with_state(backend, holder, values, out) -> RoundDriver:
    driver = RoundDriver(PLAN, backend, out)
    enc = {k: encrypted(backend, holder, v) for k, v in values.items()}
    driver.state.optimizer = HEAdamState(enc["theta"], enc["m"], enc["z"], enc["w"], step=3)
    driver.state.round = 3
    return driver


def round_context(driver: RoundDriver, round_: int, grid: RecordingGrid | None = None,
                  nodes: list[int] = NODES) -> RoundContext:
    exchange = Exchange(grid or RecordingGrid(), driver.backend, driver.organizations, timeout=5.0)
    return RoundContext(driver.plan, driver.backend, exchange, round_, list(nodes),
                        {n: i for i, n in enumerate(nodes)}, REFRESHER, RoundOutcome(round_))


def received_refresh(driver: RoundDriver, round_: int) -> wire_pb2.RefreshRequest:
    """What the refresher receives in this round's train message."""
    outgoing, _ = driver.train_messages(round_context(driver, round_), {})
    (msg,) = [m for m in outgoing if messages.REFRESH_REQUEST in m.content.array_records]
    assert msg.metadata.dst_node_id == REFRESHER
    return messages.unpack(msg.content, messages.REFRESH_REQUEST, wire_pb2.RefreshRequest, max_bytes=1 << 30)


def update_reply(holder, values: np.ndarray, round_: int) -> Message:
    update = wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION, round=round_, update=to_proto(holder, encrypt_vector(holder, values)),
        rollout_stats=to_proto(holder, encrypt_vector(holder, np.array([40.0, 2.0, 40.0]))))
    return Message(RecordDict({messages.UPDATE: messages.pack(update)}), metadata=Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=0, reply_to_message_id="q", group_id=str(round_),
        created_at=0.0, ttl=60.0, message_type=messages.TRAIN))


def received_norm_query(driver: RoundDriver, holder, updates: list[np.ndarray], round_: int) -> wire_pb2.NormQuery:
    """The norm query the robust path (``norm-bound``) sends a key holder for these updates."""
    grid = RecordingGrid()
    ctx = round_context(driver, round_, grid, nodes=list(range(21, 21 + len(updates))))
    robust = NormBound(ctx)
    for n, u in zip(ctx.nodes, updates):
        robust.add(n, update_reply(holder, u, round_))
    assert robust.finish() is None and "no key holder answered" in ctx.outcome.cause
    return grid.received(messages.NORMS, messages.NORM_QUERY, wire_pb2.NormQuery)[1]


def test_refresher_sees_only_masked_state_of_the_stated_magnitude(coordinator_backend, holder, state_values, tmp_path):
    request = received_refresh(driver_with_state(coordinator_backend, holder, state_values, tmp_path), 4)
    assert set(request.masked_state) == set(STATE_NAMES)
    for name in STATE_NAMES:
        seen = decrypt_vector(holder, from_proto(holder, request.masked_state[name]))
        mask = seen - state_values[name]
        assert np.max(np.abs(mask)) <= MASK_BOUND * (1 + 1e-6)
        assert abs(np.std(mask) / (MASK_BOUND / np.sqrt(3)) - 1) < 0.1  # uniform on +-2^15
        assert abs(np.corrcoef(seen, state_values[name])[0, 1]) < 0.15  # nothing of the state shows
        assert not np.allclose(seen, state_values[name], atol=1.0)


def test_two_coordinators_with_identical_settings_draw_different_masks(
    coordinator_backend, holder, state_values, tmp_path
):
    """Same settings, same checkpoint: the masks still differ (OS entropy, nothing to replay)."""
    first = driver_with_state(coordinator_backend, holder, state_values, tmp_path / "a")
    first.out_dir.mkdir()
    first.checkpoints.save(first.state, first.record.snapshot(first.organizations))
    second = RoundDriver(PLAN, coordinator_backend, tmp_path / "a")
    second.state, second.record = load_checkpoint(second.out_dir, coordinator_backend, "cartpole", D,
                                                  PLAN.optimizer.to_json())
    assert second.state.round == 3
    seen = [
        decrypt_vector(holder, from_proto(holder, received_refresh(c, 4).masked_state["m"])) for c in (first, second)
    ]
    assert abs(np.corrcoef(*seen)[0, 1]) < 0.15
    queries = [received_norm_query(c, holder, [state_values["theta"] * 0.01], 4) for c in (first, second)]
    slots = [decrypt_vector(holder, from_proto(holder, q.masked[0])) for q in queries]
    assert abs(np.corrcoef(*slots)[0, 1]) < 0.15  # different slot masks
    assert abs(slots[0].sum() / slots[1].sum() - 1) > 1e-3  # different secret factors on the same norm


def test_norm_query_carries_no_raw_update(coordinator_backend, holder, tmp_path):
    """Every ciphertext of the real query decrypts to mask-dominated slots; the key holder checks it too."""
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 0.01, D) for _ in range(3)]
    query = received_norm_query(RoundDriver(PLAN, coordinator_backend, tmp_path), holder, updates, 2)
    assert len(query.masked) == 3
    for vec in query.masked:
        values = decrypt_vector(holder, from_proto(holder, vec))
        assert np.max(np.abs(values)) > MASK_BOUND / 2
        assert all(abs(np.corrcoef(values[:D], u * u)[0, 1]) < 0.15 for u in updates)
    raw = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=2)
    raw.masked.append(to_proto(holder, encrypt_vector(holder, np.pad(updates[0] ** 2, (0, holder.slots - D)))))
    with pytest.raises(RequestRefusedError, match="not masked"):
        node.answer_norm_query(holder, raw)


def test_key_holder_answers_each_request_once_per_round(coordinator_backend, holder, state_values, tmp_path):
    request = received_refresh(driver_with_state(coordinator_backend, holder, state_values, tmp_path), 4)
    ledger = AnswerLedger()
    check_refresh_request(request, 4, ledger)
    with pytest.raises(RequestRefusedError, match="once"):
        check_refresh_request(request, 4, ledger)
    with pytest.raises(RequestRefusedError, match="round 4 inside a round-5"):
        check_refresh_request(request, 5, AnswerLedger())
    assert not {f.name for f, _ in request.ListFields()} - {"protocol_version", "round", "masked_state"}
    del request.masked_state["z"]  # some of the state: what the next step needs fresh
    check_refresh_request(request, 4, AnswerLedger())
    request.masked_state["theta"].CopyFrom(request.masked_state["m"])  # theta is never refreshed
    with pytest.raises(RequestRefusedError, match="expected some of"):
        check_refresh_request(request, 4, AnswerLedger())


def test_norm_query_with_more_ciphertexts_than_participants_is_refused(coordinator_backend, holder, tmp_path):
    query = received_norm_query(RoundDriver(PLAN, coordinator_backend, tmp_path), holder, [np.ones(D)] * 4, 1)
    with pytest.raises(RequestRefusedError, match="4 ciphertexts for 3 participants"):
        check_norm_query(query, 1, 3, AnswerLedger())
    ledger = AnswerLedger()
    check_norm_query(query, 1, 4, ledger)
    with pytest.raises(RequestRefusedError, match="once"):
        check_norm_query(query, 1, 4, ledger)


# -- the integrity check: one bit about the aggregate, and the round's statistics ------------------------
# Round 4 is stepped at once; its check rides on round 5's message to the refresher, or goes to one key
# holder at a time in an exchange of its own (the refresher did not answer, or round 4 was the last).
@pytest.fixture()
def integrity(coordinator_backend, holder, state_values, tmp_path):
    """The real integrity query of round 4 for an honest aggregate of 3 clipped updates, as key holders get it."""
    rng = np.random.default_rng(5)
    aggregate = sum(PLAN.units(3).encode(rng.normal(0, 1, D)) for _ in range(3))
    stats = np.array([3 * 42.0, 3.0, 3 * 42.0])
    driver = driver_with_state(coordinator_backend, holder, state_values, tmp_path)
    grid = RecordingGrid()
    ctx = round_context(driver, 4, grid)
    packed = integrity_query(ctx, Aggregate(encrypted(coordinator_backend, holder, aggregate),
                                            encrypted(coordinator_backend, holder, stats), 3))
    driver.unverified = Unverified(4, packed, driver.state.optimizer, dict.fromkeys(STATE_NAMES, 0), {}, 3, 3)
    next_round, _ = driver.train_messages(round_context(driver, 5), {})
    assert ask_verdict(ctx, packed, 4) is None  # every key holder of the recording grid fails
    assert [m.metadata.dst_node_id for m in grid.sent] == [REFRESHER] + [n for n in NODES if n != REFRESHER]
    dedicated = grid.sent[0]
    assert dedicated.metadata.message_type == messages.INTEGRITY
    query = messages.unpack(dedicated.content, messages.INTEGRITY_QUERY, wire_pb2.IntegrityQuery, max_bytes=1 << 30)
    return SimpleNamespace(aggregate=aggregate, stats=stats, dedicated=dedicated, next_round=next_round, query=query,
                           exchange=ctx.exchange)


def test_the_check_rides_on_the_next_rounds_message_to_the_refresher_only(integrity):
    for msg in integrity.next_round:
        records = set(msg.content.array_records)
        if msg.metadata.dst_node_id == REFRESHER:
            assert records == {messages.THETA, messages.REFRESH_REQUEST, messages.INTEGRITY_QUERY}
            riding = messages.unpack(msg.content, messages.INTEGRITY_QUERY, wire_pb2.IntegrityQuery, max_bytes=1 << 30)
            assert riding == integrity.query and riding.round == 4
            assert messages.config_of(msg.content)["round"] == 5
        else:
            assert records == {messages.THETA}


def test_the_integrity_query_shows_a_key_holder_only_masked_values_and_the_statistics(integrity, holder):
    query, aggregate = integrity.query, integrity.aggregate
    assert query.round == 4 and query.contributors == 3
    assert {f.name for f, _ in query.ListFields()} == {"protocol_version", "round", "masked_norm", "masked_values",
                                                       "stats", "contributors"}
    slots = decrypt_vector(holder, from_proto(holder, query.masked_norm))
    assert np.max(np.abs(slots)) > MASK_BOUND / 2  # every slot under a +-2^15 mask
    assert abs(np.corrcoef(slots[:D], aggregate * aggregate)[0, 1]) < 0.15
    assert slots.sum() < 0  # r (|S|^2 - bound^2): an honest aggregate is within the bound, by an unknown margin
    values = decrypt_vector(holder, from_proto(holder, query.masked_values))
    assert values.size == D and np.max(np.abs(values)) > MASK_BOUND / 2
    assert abs(np.corrcoef(values, aggregate)[0, 1]) < 0.15  # q S under uniform masks: S does not show
    assert decrypt_vector(holder, from_proto(holder, query.stats)) == pytest.approx(integrity.stats, abs=1e-3)


def answer(integrity, keys, content, ledger) -> wire_pb2.IntegrityReply:
    identity = NodeIdentity(1, str(keys.directory), None, PLAN)
    reply = node.handle(content, identity, 1, False, ledger)
    return messages.unpack(reply, messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply, max_bytes=1 << 20)


def test_a_key_holder_answers_a_rounds_check_once_and_releases_that_rounds_statistics(integrity, keys):
    released = wire_pb2.ReleasedMetrics(round=4, mean_return=42.0, episodes=3, steps=126, valid=True)
    ledger = AnswerLedger()
    reply = answer(integrity, keys, integrity.dedicated.content, ledger)
    assert reply.round == 4 and reply.within_bound and reply.stats_plausible and reply.released == released
    # the same check again, in round 4 or riding on a round-5 message: refused
    with pytest.raises(RequestRefusedError, match="already answered a integrity request for round 4"):
        answer(integrity, keys, integrity.dedicated.content, ledger)
    arrays = {messages.INTEGRITY_QUERY: messages.pack(integrity.query)}
    in_round_5 = integrity.exchange.message(REFRESHER, 5, 3, messages.INTEGRITY, arrays)
    with pytest.raises(RequestRefusedError, match="already answered a integrity request for round 4"):
        answer(integrity, keys, in_round_5.content, ledger)
    # a key holder that has not answered it does so in round 5, for round 4: the previous round's release
    reply = answer(integrity, keys, in_round_5.content, AnswerLedger())
    assert reply.round == 4 and reply.released == released


@pytest.mark.parametrize(
    "change, message_round, expected",
    [
        (lambda q: setattr(q, "round", 2), 4, "integrity query names round 2 inside a round-4 message"),
        (lambda q: setattr(q, "round", 5), 4, "integrity query names round 5 inside a round-4 message"),
        (lambda q: setattr(q, "round", 0), 1, "integrity query names round 0 inside a round-1 message"),
        (lambda q: setattr(q, "contributors", 0), 4, "counts no contributors"),
        (lambda q: setattr(q, "protocol_version", 1), 4, "protocol version 1"),
    ],
)
def test_integrity_queries_outside_the_protocol_are_refused(integrity, change, message_round, expected):
    query = wire_pb2.IntegrityQuery()
    query.CopyFrom(integrity.query)
    change(query)
    ledger = AnswerLedger()
    with pytest.raises(WireError, match=expected):  # a RequestRefusedError, or the version's own error
        check_integrity_query(query, message_round, ledger)
    check_integrity_query(integrity.query, 4, ledger)  # a refusal does not use up the round's answer
    assert ledger.has("integrity", 4)

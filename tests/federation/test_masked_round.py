"""Masked rounds end to end, in process: the real round driver and real participants' ``handle``.

A stand-in for Flower's Grid delivers each message to a participant at once (or never, or late);
local training is replaced by known updates so the coordinator's encrypted sum can be checked.
Covers the double masks (dropouts, a coordinator that lies about them), the integrity check
against well-formed hostile updates, and organizations naming themselves.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from flwr.app import Error, Message, Metadata

import coordinator.driver as driver_module
import participant.node as node
from coordinator.driver import RoundDriver
from coordinator.exchange import Exchange
from coordinator.report import read_metrics
from fedhe.lab.wire_attacks import HostileUpdates
from participant.answer_rules import AnswerLedger
from participant.keyholder import decrypt_vector, generate_keys
from participant.local_update import NodeIdentity
from participant.roster import simulated_organizations
from protos import messages
from protos.codec import from_proto
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import PARTICIPANT_KEY
from protos.masking import UPDATE_STREAM, SelfMaskContext, mask_grid, self_mask
from protos.plan import resolve_plan
from protos.settings import RunSettings

ORGS = 4
FIRST_NODE = 100
RUN_ID = 1


@dataclass
class FakeGrid:
    """Flower's Grid in one process: node ``FIRST_NODE + i`` is participant ``i``."""

    respond: dict[int, object]  # node -> callable(message) -> reply | None (silent)
    late: dict[int, float] = field(default_factory=dict)  # node -> seconds before its train reply shows up
    replies: dict[str, tuple[float, Message]] = field(default_factory=dict)
    pulled: set[str] = field(default_factory=set)
    sent: list[tuple[int, str, Message]] = field(default_factory=list)
    run: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(run_id=RUN_ID))

    def get_node_ids(self) -> list[int]:
        return list(self.respond)

    def push_messages(self, outgoing: list[Message]) -> list[str]:
        ids = []
        for msg in outgoing:
            mid, dst = uuid.uuid4().hex, msg.metadata.dst_node_id
            self.sent.append((dst, msg.metadata.message_type, msg))
            reply = self.respond[dst](msg)
            if reply is not None:
                delay = self.late.get(dst, 0.0) if msg.metadata.message_type == messages.TRAIN else 0.0
                self.replies[mid] = (time.monotonic() + delay, as_reply(reply, dst, mid, msg))
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        ready = [i for i in ids if i in self.replies and self.replies[i][0] <= time.monotonic()]
        self.pulled.update(ready)
        return [self.replies.pop(i)[1] for i in ready]

    def kinds(self, kind: str) -> list[int]:
        return sorted(dst for dst, k, _ in self.sent if k == kind)


def as_reply(reply: Message, src: int, mid: str, request: Message) -> Message:
    metadata = Metadata(run_id=RUN_ID, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=0,
                        reply_to_message_id=mid, group_id=request.metadata.group_id, created_at=time.time(),
                        ttl=60.0, message_type=request.metadata.message_type)
    if reply.has_error():
        return Message(reply.error, metadata=metadata)
    return Message(reply.content, metadata=metadata)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory, keys):
    """One organization key directory layout for all: participant.ctx, roster.json, organizations/."""
    directory = tmp_path_factory.mktemp("masked-keys")
    shutil.copy(keys.participant_key, directory / PARTICIPANT_KEY)
    simulated_organizations(directory, keys.fingerprint, ORGS)
    return directory


@pytest.fixture(scope="module")
def foreign_key_dir(tmp_path_factory, keys):
    """Another federation's key of the same profile."""
    return generate_keys(tmp_path_factory.mktemp("foreign-keys"), "n16k-d6").directory


@dataclass
class Federation:
    grid: FakeGrid
    driver: RoundDriver
    exchange: Exchange
    truth: dict[int, np.ndarray]
    aggregates: list
    ledgers: dict[int, AnswerLedger]
    plan: object

    def round(self, r: int):
        return self.driver.run_round(self.exchange, r)


@pytest.fixture()
def federation(key_dir, coordinator_backend, server_task, monkeypatch, tmp_path):
    """Participants 0..3 with known updates (a new one each round)."""
    plan = resolve_plan(RunSettings(masking="pairwise", participant_key_dir=str(key_dir), seed=0, min_participants=2,
                                    round_timeout=3.0, out_dir=str(tmp_path)), ORGS)
    rng = np.random.default_rng(0)
    truth = {i: plan.units(ORGS).encode(rng.normal(0, 1, plan.num_params)) for i in range(ORGS)}
    monkeypatch.setattr(node, "local_update", lambda scenario, identity, *args: (
        truth[identity.participant_index], np.array([100.0, 2.0, 200.0])))
    aggregates = []
    real_step = driver_module.parallel_he_adam_step

    def capture(workers, state, aggregate, *args):
        aggregates.append(aggregate)
        return real_step(workers, state, aggregate, *args)

    monkeypatch.setattr(driver_module, "parallel_he_adam_step", capture)
    ledgers = {FIRST_NODE + i: AnswerLedger() for i in range(ORGS)}

    def participant(i: int):
        identity = NodeIdentity(i, str(key_dir), None, plan)

        def respond(msg: Message) -> Message:
            try:
                training = msg.metadata.message_type == messages.TRAIN
                content = node.handle(msg.content, identity, RUN_ID, training, ledgers[FIRST_NODE + i])
            except Exception as exc:  # as the ClientApp does: one error reply
                return Message(Error(1004, f"participant-{i}: {type(exc).__name__}: {exc}"), reply_to=msg)
            return Message(content, reply_to=msg)

        return respond

    grid = FakeGrid({FIRST_NODE + i: participant(i) for i in range(ORGS)})
    driver = RoundDriver(plan, coordinator_backend, tmp_path)
    exchange = Exchange(grid, coordinator_backend, driver.organizations, plan.settings.round_timeout)
    return Federation(grid, driver, exchange, truth, aggregates, ledgers, plan)


def failing(respond, kinds: set[str]):
    def wrapped(msg: Message) -> Message:
        if msg.metadata.message_type in kinds:
            return Message(Error(1006, "participant: its environment failed"), reply_to=msg)
        return respond(msg)

    return wrapped


def rewrite_train_replies(grid, node: int, hostile: HostileUpdates) -> None:
    """``node`` answers as before, its train replies rewritten by ``hostile`` (an attacker among key holders)."""
    honest = grid.respond[node]

    def attacker(msg: Message) -> Message:
        reply = honest(msg)
        if reply.has_error() or msg.metadata.message_type != messages.TRAIN:
            return reply
        round_ = int(msg.content.config_records[messages.CONFIG]["round"])
        return Message(hostile.rewrite(reply.content, round_), reply_to=msg)

    grid.respond[node] = attacker


def test_a_round_sums_exactly_and_names_its_organizations(federation, holder):
    outcome = federation.round(1)
    assert outcome.completed and outcome.answered == [f"participant-{i}" for i in range(ORGS)]
    assert federation.grid.kinds(messages.IDENTIFY) == [FIRST_NODE + i for i in range(ORGS)]
    assert federation.grid.kinds(messages.UNMASK) == [FIRST_NODE + i for i in range(ORGS)]  # self-masks only
    unmask = [msg for _, kind, msg in federation.grid.sent if kind == messages.UNMASK]
    request = messages.unpack(unmask[0].content, messages.UNMASK_REQUEST, wire_pb2.UnmaskRequest, max_bytes=1 << 20)
    assert list(request.dropped) == [] and len(request.shares) == ORGS - 1
    aggregate = decrypt_vector(holder, federation.aggregates[0])
    assert aggregate == pytest.approx(sum(federation.truth.values()), abs=1e-6)
    assert federation.driver.organizations.summary()["participant-2"]["rounds_answered"] == 1


def test_a_participant_dropping_out_mid_round_is_recovered(federation, holder):
    grid = federation.grid
    grid.respond[FIRST_NODE + 2] = failing(grid.respond[FIRST_NODE + 2], {messages.TRAIN})
    outcome = federation.round(1)
    assert outcome.completed and len(outcome.answered) == 3
    assert outcome.failed == [{"organization": "participant-2", "category": "environment",
                               "reason": "participant: its environment failed"}]
    assert outcome.extras["mask_dropped"] == [2]
    assert grid.kinds(messages.UNMASK) == [FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 3]
    truth = federation.truth
    assert decrypt_vector(holder, federation.aggregates[0]) == pytest.approx(truth[0] + truth[1] + truth[3], abs=1e-6)
    assert not federation.ledgers[FIRST_NODE + 2].has("unmask", 1)


def test_a_gone_participant_costs_once(federation, holder):
    """Dies in round 1's training: round 1 corrects for it, later rounds mask over the others only."""
    grid = federation.grid
    alive = grid.respond[FIRST_NODE + 3]
    grid.respond[FIRST_NODE + 3] = lambda msg: alive(msg) if msg.metadata.message_type == messages.IDENTIFY else None
    first = federation.round(1)
    assert first.completed and first.extras["mask_dropped"] == [3]
    grid.respond[FIRST_NODE + 3] = lambda msg: None  # dead
    grid.sent.clear()
    outcome = federation.round(2)
    assert outcome.completed and outcome.extras["mask_dropped"] == []
    assert grid.kinds(messages.TRAIN) == [FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 2]
    assert grid.kinds(messages.IDENTIFY) == [FIRST_NODE + 3]  # asked again, without waiting
    assert federation.driver.organizations.summary()["participant-3"]["status"] == "gone"
    grid.sent.clear()
    federation.round(3)
    assert grid.kinds(messages.IDENTIFY) == []  # its question is still open: asked once


def test_a_late_reply_is_discarded_and_the_round_completes_without_it(federation, holder):
    grid = federation.grid
    grid.late[FIRST_NODE + 3] = federation.plan.settings.round_timeout + 1.0  # arrives after the set is fixed
    outcome = federation.round(1)
    assert outcome.completed and outcome.extras["mask_dropped"] == [3]
    truth = federation.truth
    assert decrypt_vector(holder, federation.aggregates[0]) == pytest.approx(truth[0] + truth[1] + truth[2], abs=1e-6)
    late = [mid for mid, (_, reply) in grid.replies.items() if reply.metadata.src_node_id == FIRST_NODE + 3]
    assert late and not set(late) & grid.pulled  # never read


def test_a_survivor_silent_at_the_unmask_costs_nothing_when_no_member_dropped(federation, holder):
    """Its update is in the sum, its pair masks cancel; the others' shares rebuild its self-mask."""
    grid = federation.grid
    grid.respond[FIRST_NODE + 1] = failing(grid.respond[FIRST_NODE + 1], {messages.UNMASK})
    outcome = federation.round(1)
    assert outcome.completed and outcome.extras["mask_dropped"] == []
    assert [f["organization"] for f in outcome.failed] == ["participant-1"]
    aggregate = decrypt_vector(holder, federation.aggregates[0])
    assert aggregate == pytest.approx(sum(federation.truth.values()), abs=1e-6)


def test_a_survivor_silent_at_the_unmask_after_a_dropout_fails_the_round_and_changes_nothing(federation):
    """Its corrections for the dropped member are missing: masks would stay in the sum."""
    grid = federation.grid
    grid.respond[FIRST_NODE + 3] = failing(grid.respond[FIRST_NODE + 3], {messages.TRAIN})
    grid.respond[FIRST_NODE + 1] = failing(grid.respond[FIRST_NODE + 1], {messages.UNMASK})
    outcome = federation.round(1)
    assert not outcome.completed and federation.aggregates == []
    assert "participant-1 did not unmask" in outcome.cause
    assert federation.driver.state.round == 0 and federation.driver.state.optimizer is None
    assert [r["round"] for r in federation.driver.record.failed_rounds] == [1]


def test_too_few_survivors_for_a_masked_sum_fail_the_round(federation):
    grid = federation.grid
    for i in (2, 3):
        grid.respond[FIRST_NODE + i] = failing(grid.respond[FIRST_NODE + i], {messages.TRAIN})
    outcome = federation.round(1)
    assert not outcome.completed and "needs at least 3" in outcome.cause
    assert grid.kinds(messages.UNMASK) == []


def test_a_coordinator_lying_about_a_dropout_learns_nothing_with_one_key_holder(federation, holder):
    """The coordinator claims live participant 0 dropped; participant 1 colludes and gives everything.

    Honest survivors 2 and 3 correct their pair masks with 0 but open no share of 0's seed; the
    colluder's one share is below the threshold, so 0's self-mask stays on its update."""
    grid, plan = federation.grid, federation.plan
    federation.round(1)  # identifies everybody and gives the run a theta
    r, victim, colluder = 2, 0, 1
    # round 2's train messages, as the driver sends them, and every participant's reply
    config = {"members": list(range(ORGS))}
    replies = {}
    for i in range(ORGS):
        msg = federation.exchange.message(FIRST_NODE + i, r, ORGS, messages.TRAIN,
                                          federation.driver.theta_arrays(), config)
        replies[i] = messages.unpack(grid.respond[FIRST_NODE + i](msg).content, messages.UPDATE,
                                     wire_pb2.ParticipantUpdate, max_bytes=1 << 28)
    shares_to = {j: [s for i in range(ORGS) for s in replies[i].masking.shares if s.recipient == j]
                 for j in range(ORGS)}
    # the lie: survivors {1, 2, 3}, victim 0 dropped (its shares are withheld from the honest ones)
    revealed, corrections = [], []
    for j in (2, 3):
        request = wire_pb2.UnmaskRequest(protocol_version=2, round=r, survivors=[1, 2, 3], dropped=[victim],
                                         shares=[s for s in shares_to[j] if s.sender != victim])
        msg = federation.exchange.message(FIRST_NODE + j, r, ORGS, messages.UNMASK,
                                          {messages.UNMASK_REQUEST: messages.pack(request)})
        answer = messages.unpack(grid.respond[FIRST_NODE + j](msg).content, messages.UNMASK_REPLY,
                                 wire_pb2.UnmaskReply, max_bytes=1 << 28)
        assert all(share.sender != victim for share in answer.shares)
        revealed += list(answer.shares)
        corrections.append(decrypt_vector(holder, from_proto(holder, answer.update)))
        # and the same honest survivor never opens the victim's share afterwards
        again = wire_pb2.UnmaskRequest(protocol_version=2, round=r, survivors=list(range(ORGS)),
                                       shares=[s for s in shares_to[j] if s.sender == victim])
        msg = federation.exchange.message(FIRST_NODE + j, r, ORGS, messages.UNMASK,
                                          {messages.UNMASK_REQUEST: messages.pack(again)})
        assert grid.respond[FIRST_NODE + j](msg).has_error()
    # the colluder knows its own pair mask with the victim and opens its share of the victim's seed
    masker = node.cached_masker(str(plan.settings.participant_key_dir), colluder, holder.fingerprint)
    colluder_pair = masker.pair_mask([victim], RUN_ID, r, UPDATE_STREAM, plan.num_params)
    victim_shares = [masker.open_share(s, RUN_ID, r) for s in shares_to[colluder] if s.sender == victim]
    assert len(victim_shares) == 1 and replies[victim].masking.threshold >= 2
    # best effort: strip every pair mask of the victim (the honest corrections are its terms with 2 and 3,
    # the colluder's own term it knows), then remove a self-mask rebuilt from what shares exist
    g = mask_grid(UPDATE_STREAM, ORGS)
    masked = decrypt_vector(holder, from_proto(holder, replies[victim].update))
    stripped = masked - sum(corrections) + colluder_pair.astype(np.float64) * g
    context = SelfMaskContext(holder.fingerprint, RUN_ID, r, victim)
    true = federation.truth[victim]

    def recovered(second_share) -> np.ndarray:
        seed = Shamir.combine([(victim_shares[0].x, bytes(victim_shares[0].share)), second_share])
        return stripped - self_mask(seed, context, UPDATE_STREAM, plan.num_params, ORGS)

    guessed = recovered((victim_shares[0].x % ORGS + 1, bytes(16)))  # a share the colluder does not have
    # no better than chance: the sample correlation of unrelated vectors has std 1/sqrt(n) (0.035 here)
    assert abs(np.corrcoef(guessed, true)[0, 1]) < 5 / np.sqrt(plan.num_params)
    # control: a second colluding key holder's share would give it away, so the test can fail
    second = node.cached_masker(str(plan.settings.participant_key_dir), 2, holder.fingerprint)
    share = next(second.open_share(s, RUN_ID, r) for s in shares_to[2] if s.sender == victim)
    assert recovered((share.x, bytes(share.share))) == pytest.approx(true, abs=1e-6)


def test_well_formed_hostile_updates_never_change_the_model(federation, key_dir, foreign_key_dir, tmp_path):
    """Participant 3 sends a ciphertext under another key claiming the federation's fingerprint, its
    round-1 update relabelled, its update plus 50 and plus 1000 per coordinate.

    A round is stepped at once and checked with the next round's messages: a refused round is undone,
    and the next one, whose participants trained on it, discarded. The relabelled replay is stopped
    before its step: its shares, sealed for round 1, do not open, so its self-mask cannot be rebuilt."""
    attacks = {2: "other-key", 4: "replay", 6: "inflate-50", 8: "inflate-1000"}
    hostile = HostileUpdates(3, attacks, key_dir, tmp_path / "sent", foreign_key_dir)
    grid, driver = federation.grid, federation.driver
    rewrite_train_replies(grid, FIRST_NODE + 3, hostile)
    assert federation.round(1).completed
    confirmed_theta = None
    for r in range(2, 11):
        federation.round(r)
        if r == 2:
            confirmed_theta = federation.driver.unverified.before.theta  # round 1's result
        if r in (3, 7, 9):  # the check of the round before refused it: back to the last confirmed state
            assert driver.state.optimizer.theta is confirmed_theta
        confirmed_theta = driver.state.optimizer.theta if r in (5, 10) else confirmed_theta
    driver.settle_last(federation.exchange)
    causes = {f["round"]: f["cause"] for f in driver.record.failed_rounds}
    assert all(causes[r].startswith("integrity:") for r in (2, 6, 8)), causes
    assert all(causes[r].startswith("discarded") for r in (3, 7, 9)), causes
    # the replay never gets a step: its shares do not open (or, left out of the masked set after round 2's
    # refusal, its round-1 update no longer fits the round's set)
    assert 4 in causes and not causes[4].startswith("integrity:")
    assert driver.record.summary(driver.organizations)["integrity_failures"] == [2, 6, 8]
    assert [row["round"] for row in read_metrics(tmp_path)] == [1, 5, 10]  # only confirmed rounds are recorded


def test_a_persistent_offender_is_found_by_leaving_organizations_out_and_then_left_out(federation, key_dir,
                                                                                         tmp_path):
    """Participant 3 inflates its update every round from round 2: after the first refused round the
    coordinator leaves suspects out of later rounds (still 3 members each), finds it, leaves it out of the
    run, and training goes on without it."""
    hostile = HostileUpdates(3, {r: "inflate-50" for r in range(2, 30)}, key_dir, tmp_path / "sent")
    grid, driver = federation.grid, federation.driver
    rewrite_train_replies(grid, FIRST_NODE + 3, hostile)
    for r in range(1, 11):
        federation.round(r)
    driver.settle_last(federation.exchange)
    summary = driver.organizations.summary()
    assert summary["participant-3"]["status"] == "excluded" and summary["participant-3"]["why"].get("integrity") == 1
    assert all(summary[f"participant-{i}"]["status"] == "active" for i in range(3))
    rows = read_metrics(tmp_path)
    assert rows[-1]["round"] == 10 and rows[-1]["answered"] == ["participant-0", "participant-1", "participant-2"]
    assert all(len(r["answered"]) >= 3 for r in rows)  # every masked sum kept its minimum

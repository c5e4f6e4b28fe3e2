"""One masked round end to end, in process: the real coordinator loop and real participants' ``handle``.

A stand-in for Flower's Grid delivers each message to a participant at once (or never, or late);
local training is replaced by known updates so the coordinator's encrypted sum can be checked.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata

import coordinator.rounds as rounds
import participant.node as node
from coordinator.rounds import HEAdamCoordinator
from participant.answer_rules import AnswerLedger
from participant.keyholder import decrypt_vector
from participant.local_update import NodeIdentity
from participant.roster import simulated_organizations
from protos import messages
from protos.keyfile import PARTICIPANT_KEY
from protos.optimizer import HEAdamConfig
from protos.settings import RunSettings
from protos.update_units import UpdateUnits
from scenarios import resolve_run

ORGS = 4
FIRST_NODE = 100


@dataclass
class FakeGrid:
    """Flower's Grid in one process: node ``FIRST_NODE + i`` is participant ``i``."""

    respond: dict[int, object]  # node -> callable(message) -> reply | None (silent)
    late: dict[int, float] = field(default_factory=dict)  # node -> seconds before its train reply shows up
    replies: dict[str, tuple[float, Message]] = field(default_factory=dict)
    pulled: set[str] = field(default_factory=set)
    sent: list[tuple[int, str]] = field(default_factory=list)

    def get_node_ids(self) -> list[int]:
        return list(self.respond)

    def push_messages(self, outgoing: list[Message]) -> list[str]:
        ids = []
        for msg in outgoing:
            mid, dst = uuid.uuid4().hex, msg.metadata.dst_node_id
            self.sent.append((dst, msg.metadata.message_type))
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


def as_reply(reply: Message, src: int, mid: str, request: Message) -> Message:
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=src, dst_node_id=0,
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


@pytest.fixture()
def federation(key_dir, coordinator_backend, server_task, monkeypatch, tmp_path):
    """Participants 0..3 with known updates; returns (grid, coordinator, true updates, captured aggregates)."""
    scenario, run = resolve_run(RunSettings(masking="pairwise", participant_key_dir=str(key_dir), seed=0), ORGS)
    config = HEAdamConfig.for_scenario(scenario)
    num_params = scenario.network(run.mode).num_params
    rng = np.random.default_rng(0)
    truth = {i: UpdateUnits.of(config, ORGS).encode(rng.normal(0, 1, num_params)) for i in range(ORGS)}
    monkeypatch.setattr(node, "local_update", lambda scenario, identity, *args: (
        truth[identity.participant_index], np.array([100.0, 2.0, 200.0])))
    aggregates = []
    real_step = rounds.parallel_he_adam_step

    def capture(workers, state, aggregate, *args):
        aggregates.append(aggregate)
        return real_step(workers, state, aggregate, *args)

    monkeypatch.setattr(rounds, "parallel_he_adam_step", capture)
    ledgers = {FIRST_NODE + i: AnswerLedger() for i in range(ORGS)}

    def participant(i: int):
        identity = NodeIdentity(i, str(key_dir), None, run)

        def respond(msg: Message) -> Message:
            try:
                training = msg.metadata.message_type == messages.TRAIN
                content = node.handle(msg.content, scenario, identity, 1, training, ledgers[FIRST_NODE + i])
            except Exception as exc:  # as the ClientApp does: one error reply
                return Message(Error(0, f"participant {i}: {exc}"), reply_to=msg)
            return Message(content, reply_to=msg)

        return respond

    grid = FakeGrid({FIRST_NODE + i: participant(i) for i in range(ORGS)})
    coordinator = HEAdamCoordinator(coordinator_backend, config, scenario.name, num_params, tmp_path,
                                    min_participants=2, round_timeout=3.0, masking="pairwise")
    return grid, coordinator, truth, aggregates, ledgers


def failing(respond, kinds: set[str]):
    def wrapped(msg: Message) -> Message:
        if msg.metadata.message_type in kinds:
            return Message(Error(0, "participant: simulator lost its license server"), reply_to=msg)
        return respond(msg)

    return wrapped


def decrypted(holder, aggregate) -> np.ndarray:
    return decrypt_vector(holder, aggregate)


def test_a_round_without_dropouts_needs_no_extra_exchange(federation, holder):
    grid, coordinator, truth, aggregates, _ = federation
    outcome = coordinator.run_round(grid, 1)
    assert outcome.completed and outcome.answered == ORGS
    assert not any(kind == messages.UNMASK for _, kind in grid.sent)
    assert decrypted(holder, aggregates[0]) == pytest.approx(sum(truth.values()), abs=1e-6)


def test_a_participant_dropping_out_mid_round_is_recovered(federation, holder):
    grid, coordinator, truth, aggregates, ledgers = federation
    grid.respond[FIRST_NODE + 2] = failing(grid.respond[FIRST_NODE + 2], {messages.TRAIN})
    outcome = coordinator.run_round(grid, 1)
    assert outcome.completed and outcome.answered == 3 and len(outcome.failed) == 1
    assert outcome.extras["mask_dropped"] == [2]
    unmask = sorted(dst for dst, kind in grid.sent if kind == messages.UNMASK)
    assert unmask == [FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 3]  # one extra exchange, the answered only
    assert decrypted(holder, aggregates[0]) == pytest.approx(truth[0] + truth[1] + truth[3], abs=1e-6)
    assert not ledgers[FIRST_NODE + 2].has("unmask", 1)


def test_a_late_reply_is_discarded_and_the_round_completes_without_it(federation, holder):
    grid, coordinator, truth, aggregates, _ = federation
    grid.late[FIRST_NODE + 3] = coordinator.round_timeout + 1.0  # arrives after the set is fixed
    outcome = coordinator.run_round(grid, 1)
    assert outcome.completed and outcome.answered == 3 and outcome.extras["mask_dropped"] == [3]
    assert decrypted(holder, aggregates[0]) == pytest.approx(truth[0] + truth[1] + truth[2], abs=1e-6)
    late = [mid for mid, (_, reply) in grid.replies.items() if reply.metadata.src_node_id == FIRST_NODE + 3]
    assert late and not set(late) & grid.pulled  # never read


def test_a_missing_correction_fails_the_round_and_changes_nothing(federation):
    grid, coordinator, _, aggregates, _ = federation
    grid.respond[FIRST_NODE + 2] = failing(grid.respond[FIRST_NODE + 2], {messages.TRAIN})
    grid.respond[FIRST_NODE + 1] = failing(grid.respond[FIRST_NODE + 1], {messages.UNMASK})
    outcome = coordinator.run_round(grid, 1)
    assert not outcome.completed and aggregates == []
    assert coordinator.state.round == 0 and coordinator.state.optimizer is None
    assert [r["round"] for r in coordinator.failed_rounds] == [1]


def test_unmasked_and_masked_replies_never_mix(federation):
    """A coordinator with masking off records a masked update as that participant's failure."""
    grid, coordinator, _, _, _ = federation
    coordinator.masking = "off"
    outcome = coordinator.run_round(grid, 1)
    assert not outcome.completed and outcome.answered == 0
    assert all("masking off" in line for line in outcome.failed)

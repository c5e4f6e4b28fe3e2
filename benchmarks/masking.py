"""`fedhe bench masking`: double masks under CKKS, every role in one process, through the wire format.

1. A fresh federation key and a roster of ``participants`` simulated organizations (temp dir).
2. Every participant draws an update in update units whose coordinates are uniform over the whole
   range an update coordinate can take (``+-C s / n``: the worst case for hiding) and rollout
   statistics.
3. One masked round in process (``LocalFederation``): the coordinator's own aggregation path
   (``coordinator.aggregation.PairwiseMaskedSum``) sends the train messages naming the masking set
   through a stand-in for Flower's Grid; participants answer with the participant's own code
   (``participant.node``: ``round_masks``, ``encrypted_update``, ``reply_unmask``); the path sums
   the masked ciphertexts as they arrive, runs the unmask exchange (every survivor opens its shares
   of the others' self-mask seeds) and subtracts the rebuilt self-masks.
   ``update_correlation``: the secret key decrypts each participant's update ciphertext; the
   largest absolute Pearson correlation, over participants, with its true update.
   ``sum_abs_err`` (largest coordinate error) and ``sum_rel_err`` (L2, relative) compare the
   decrypted aggregate with the true sum; ``unmasked_sum_*`` are the same for a round with
   masking off (``PlainSum``, the same path without masks).
4. Dropout: the last ``dropouts`` participants' updates never arrive; the survivors' unmask replies
   also carry corrections of their pair masks with the dropped; ``dropout_sum_abs_err`` against
   the true sum of the survivors. A masked sum needs at least 3 survivors, and each survivor's
   seed needs its threshold of shares (a majority of the other members) among the other survivors.

``ms_per_participant``: one participant's masking: deriving and adding its pair masks and
self-mask (update and statistics), splitting its seed into Shamir shares and sealing one per member.
``unmask_ms`` / ``unmask_ms_with_dropout``: the unmask exchange that ends every masked round,
without and with the dropouts: the coordinator's part (``unmask_coordinator_ms``: requests,
reading replies, rebuilding seeds, subtracting self-masks) plus one survivor's answer
(``unmask_survivor_ms``, the mean; survivors answer in parallel: opening shares and, with
dropouts, encrypting corrections); ``unmask_bytes`` (``_with_dropout``): requests and replies.
``hiding_bound``: statistical distance, per coordinate, between the masked views of any two
updates (``|a - a'| / 2R`` with ``|a|, |a'| <= C s / n``).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

import participant.node as node
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.aggregation import Aggregate, Aggregation, PlainSum, RoundContext
from coordinator.aggregation.masked_sum import MIN_SURVIVORS, PairwiseMaskedSum
from coordinator.exchange import Exchange, RoundOutcome
from coordinator.organizations import Organizations
from participant.answer_rules import AnswerLedger
from participant.keyholder import KeyHolder, decrypt_vector, generate_keys, load_keyholder
from participant.local_update import NodeIdentity
from participant.pairwise_masks import PairwiseMasker
from participant.roster import simulated_organizations
from protos import messages
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION, EncryptedVector, from_proto
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.masking import STATS_STREAM, UPDATE_STREAM, default_threshold, hiding_bound, mask_grid
from protos.optimizer import HEAdamConfig
from protos.plan import resolve_plan
from protos.profiles import DEFAULT_PROFILE
from protos.settings import RunSettings
from protos.update_units import UpdateUnits
from scenarios import load_scenario

RUN = 1
FIRST_NODE = 100  # node FIRST_NODE + i is participant i


@dataclass(frozen=True)
class LengthPlan:
    """What the sum paths read of the run plan: the update length (the bench's own, not a scenario's)."""

    num_params: int

    def update_length(self, slots: int) -> int:
        return self.num_params


@contextmanager
def server_task(run_id: int = RUN) -> Iterator[None]:
    """Flower stamps new messages with the running task's identity: here the bench plays the ServerApp's
    task (as Flower's own legacy in-process API does), and the identity before is restored."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LocalGrid:
    """Flower's Grid in one process: each message is answered at once by ``answer`` (None: never)."""

    def __init__(self, answer: Callable[[int, Message], RecordDict | None]) -> None:
        self.answer = answer
        self.run = SimpleNamespace(run_id=RUN)
        self.replies: dict[str, Message] = {}

    def push_messages(self, outgoing: list[Message]) -> list[str]:
        ids = []
        for msg in outgoing:
            mid = uuid.uuid4().hex
            content = self.answer(msg.metadata.dst_node_id, msg)
            if content is not None:
                self.replies[mid] = Message(content, metadata=Metadata(
                    run_id=RUN, message_id=uuid.uuid4().hex, src_node_id=msg.metadata.dst_node_id, dst_node_id=0,
                    reply_to_message_id=mid, group_id=msg.metadata.group_id, created_at=time.time(), ttl=60.0,
                    message_type=msg.metadata.message_type))
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


class LocalFederation:
    """Participants ``0..n-1`` with known updates and statistics, and the coordinator's aggregation path.

    The participants run the participant's code on each message (masking over the set the train
    message names, one update per round, unmasking only as the answer rules allow); the
    coordinator side is ``coordinator.aggregation`` on an ``Exchange`` over ``LocalGrid``.
    """

    def __init__(self, key_dir: Path, holder: KeyHolder, backend: HEBackend, updates: list[np.ndarray],
                 stats: list[np.ndarray], masked: bool = True) -> None:
        self.holder, self.backend, self.updates, self.stats = holder, backend, updates, stats
        self.size, self.params = len(updates), len(updates[0])
        self.plan = resolve_plan(RunSettings(masking="pairwise"), self.size)  # only its node rules are read
        self.maskers = ([PairwiseMasker.load(key_dir, i, holder.fingerprint) for i in range(self.size)]
                        if masked else None)
        self.ledgers = [AnswerLedger() for _ in range(self.size)]
        self.silent: set[int] = set()  # participants whose train reply never arrives
        # (participant, message type, round, request, reply, milliseconds to answer) of every answered message
        self.sent: list[tuple[int, str, int, RecordDict, RecordDict, float]] = []
        self.organizations = Organizations()
        for i in range(self.size):
            self.organizations.identify(FIRST_NODE + i, i, f"participant-{i}")
        self.grid = LocalGrid(self.answer)

    def exchange(self, i: int, msg: Message) -> node.Exchange:
        """Participant ``i``'s view of one message, as ``participant.node.open_exchange`` builds it."""
        config = messages.config_of(msg.content)
        round_ = int(config["round"])
        reply = RecordDict({messages.CONFIG: ConfigRecord(
            {"round": round_, "key-fingerprint": self.holder.fingerprint, "protocol-version": PROTOCOL_VERSION})})
        return node.Exchange(content=msg.content, scenario=None, identity=NodeIdentity(i, "", None, self.plan),
                             run_id=RUN, ledger=self.ledgers[i], holder=self.holder, round=round_,
                             participants=int(config["participants"]), num_params=self.params,
                             update_length=self.params, layout=None,
                             masker=self.maskers[i] if self.maskers else None, reply=reply)

    def answer(self, dst: int, msg: Message) -> RecordDict | None:
        i, kind = dst - FIRST_NODE, msg.metadata.message_type
        if kind == messages.TRAIN and i in self.silent:
            return None
        t0 = time.perf_counter()
        exchange = self.exchange(i, msg)
        if kind == messages.TRAIN:
            update = node.encrypted_update(self.holder, exchange.round, self.updates[i], self.stats[i],
                                           node.round_masks(exchange))
            exchange.reply[messages.UPDATE] = messages.pack(update)
        else:
            for record, reply in node.REPLIES:
                if exchange.has(record):
                    reply(exchange)
        self.sent.append((i, kind, exchange.round, msg.content, exchange.reply, (time.perf_counter() - t0) * 1e3))
        return exchange.reply

    def round(self, round_: int) -> tuple[Aggregation, Aggregate | None]:
        """One round: train messages to every participant not silent, replies summed, the path's own exchange."""
        nodes = [FIRST_NODE + i for i in range(self.size)]
        exchange = Exchange(self.grid, self.backend, self.organizations, timeout=60.0)
        ctx = RoundContext(LengthPlan(self.params), self.backend, exchange, round_, nodes,
                           {n: n - FIRST_NODE for n in nodes}, nodes[0], RoundOutcome(round_))
        aggregation = (PairwiseMaskedSum if self.maskers else PlainSum)(ctx)
        with server_task():
            outgoing = [exchange.message(n, round_, len(nodes), messages.TRAIN, {}, aggregation.train_config())
                        for n in nodes if n - FIRST_NODE not in self.silent]
            for n, reply in exchange.stream(outgoing, ctx.outcome):
                aggregation.add(n, reply)
            return aggregation, aggregation.finish()

    def uploads(self, round_: int) -> dict[int, wire_pb2.ParticipantUpdate]:
        """Each participant's update of ``round_``, as it left the participant."""
        return {i: messages.unpack(content, messages.UPDATE, wire_pb2.ParticipantUpdate, max_bytes=1 << 30)
                for i, kind, r, _, content, _ in self.sent if kind == messages.TRAIN and r == round_}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def run_masking_bench(
    participants: int = 5,
    params: int = 16384,
    dropouts: int = 1,
    profile: str = DEFAULT_PROFILE,
    scenario: str = "cartpole",
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    survivors, threshold = participants - dropouts, default_threshold(participants)
    needed = max(MIN_SURVIVORS, threshold + 1)
    if dropouts < 1 or survivors < needed:
        raise ValueError(
            f"{participants} participants with {dropouts} dropouts leave {survivors} survivors; the dropout round "
            f"needs at least 1 dropout and {needed} survivors (a masked sum needs {MIN_SURVIVORS}, and each "
            f"survivor's self-mask {threshold} shares held by the other survivors)"
        )
    step = on_step or (lambda _: None)
    units = UpdateUnits.of(HEAdamConfig.of(load_scenario(scenario).server), participants)
    bound = units.clip * units.factor  # the largest an update coordinate can be: C s / n
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-bound, bound, params) for _ in range(participants)]
    stats = [np.array([rng.uniform(0, 500) * 8, 8.0, float(rng.integers(1000, 4096))]) for _ in range(participants)]
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-masking-") as tmp:
        keys = generate_keys(Path(tmp), profile)
        simulated_organizations(Path(tmp), keys.fingerprint, participants)
        holder, coordinator = load_keyholder(keys.directory), load_evaluation_backend(keys.coordinator_key)
        masked = LocalFederation(Path(tmp), holder, coordinator, updates, stats)
        plain = LocalFederation(Path(tmp), holder, coordinator, updates, stats, masked=False)
    step("keys")

    everyone = list(range(participants))
    mask_ms = []
    for masker, update, stat in zip(masked.maskers, updates, stats):
        t0 = time.perf_counter()
        masks = masker.round(RUN, 0, everyone)
        masks.mask(update, UPDATE_STREAM)
        masks.mask(stat, STATS_STREAM)
        masks.metadata()
        mask_ms.append((time.perf_counter() - t0) * 1e3)
    step("participants")

    def error(vec: EncryptedVector, members: list[int]) -> tuple[float, float]:
        total = decrypt_vector(holder, decode_vector(holder, encode_vector(coordinator, vec)))
        true = np.sum([updates[i] for i in members], axis=0)
        return float(np.max(np.abs(total - true))), float(np.linalg.norm(total - true) / np.linalg.norm(true))

    def stats_error(vec: EncryptedVector, members: list[int]) -> float:
        total = decrypt_vector(holder, decode_vector(holder, encode_vector(coordinator, vec)))
        return float(np.max(np.abs(total - np.sum([stats[i] for i in members], axis=0))))

    def masked_round(round_: int) -> tuple[Aggregate, dict]:
        """One masked round, and what its unmask exchange cost."""
        aggregation, aggregate = masked.round(round_)
        if aggregate is None:
            raise RuntimeError(f"the masked round changed nothing: {aggregation.ctx.outcome.cause}")
        exchanged = [(ms, request, reply) for i, kind, r, request, reply, ms in masked.sent
                     if kind == messages.UNMASK and r == round_]
        survivor_ms = [ms for ms, _, _ in exchanged]
        coordinator_ms = aggregation.ctx.outcome.timer.ms["unmask"] - sum(survivor_ms)  # in process: serial
        return aggregate, {
            "ms": round(coordinator_ms + float(np.mean(survivor_ms)), 3),
            "coordinator_ms": round(coordinator_ms, 3),
            "survivor_ms": round(float(np.mean(survivor_ms)), 3),
            "bytes": sum(messages.payload_bytes(request) + messages.payload_bytes(reply)
                         for _, request, reply in exchanged),
            "dropped": aggregation.ctx.outcome.extras["mask_dropped"],
        }

    full, full_cost = masked_round(1)
    seen = {i: decrypt_vector(holder, from_proto(holder, upload.update)) for i, upload in masked.uploads(1).items()}
    update_correlation = max(abs(correlation(seen[i], updates[i])) for i in everyone)
    sum_abs_err, sum_rel_err = error(full.update, everyone)
    _, baseline = plain.round(1)
    unmasked_abs_err, unmasked_rel_err = error(baseline.update, everyone)
    step("sum")

    # Dropout: the last `dropouts` never answer; the survivors also cancel their pair masks with them.
    alive = everyone[:survivors]
    masked.silent = set(everyone[survivors:])
    partial, dropout_cost = masked_round(2)
    if dropout_cost["dropped"] != everyone[survivors:]:
        raise RuntimeError(f"the coordinator corrected for {dropout_cost['dropped']}, not {everyone[survivors:]}")
    dropout_abs_err, _ = error(partial.update, alive)
    step("dropout")

    return {
        "profile": coordinator.profile.name,
        "participants": participants,
        "params": params,
        "dropouts": dropouts,
        "threshold": threshold,
        "update_correlation": round(update_correlation, 5),
        "sum_abs_err": sum_abs_err,
        "sum_rel_err": sum_rel_err,
        "unmasked_sum_abs_err": unmasked_abs_err,
        "unmasked_sum_rel_err": unmasked_rel_err,
        "stats_sum_abs_err": stats_error(full.stats, everyone),
        "dropout_sum_abs_err": dropout_abs_err,
        "dropout_stats_sum_abs_err": stats_error(partial.stats, alive),
        "mask_bound": UPDATE_STREAM.bound,
        "stats_mask_bound": STATS_STREAM.bound,
        "update_coordinate_bound": bound,
        "hiding_bound": hiding_bound(UPDATE_STREAM, bound),
        "mask_grid": mask_grid(UPDATE_STREAM, participants),
        "ms_per_participant": round(float(np.mean(mask_ms)), 3),
        "unmask_ms": full_cost["ms"],
        "unmask_coordinator_ms": full_cost["coordinator_ms"],
        "unmask_survivor_ms": full_cost["survivor_ms"],
        "unmask_bytes": full_cost["bytes"],
        "unmask_ms_with_dropout": dropout_cost["ms"],
        "unmask_coordinator_ms_with_dropout": dropout_cost["coordinator_ms"],
        "unmask_survivor_ms_with_dropout": dropout_cost["survivor_ms"],
        "unmask_bytes_with_dropout": dropout_cost["bytes"],
    }

"""One participant's work per message: decrypt theta, refresh or answer if asked, train, mask, encrypt.

Everything that leaves this module is a protobuf of ciphertexts plus the plaintext metadata in
the egress allowlist (``participant.audit``). Observations, actions, rewards, returns and the
update itself stay here; only rounded federation-level aggregates are ever released.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from google.protobuf.message import Message as ProtoMessage

from participant.answer_rules import (
    AnswerLedger,
    check_gradient_query,
    check_integrity_query,
    check_members,
    check_norm_query,
    check_refresh_request,
    check_unmask_request,
    require_masked,
)
from participant.gradient_collapse import collapse_masked
from participant.keyholder import KeyHolder, PlainKeyHolder, decrypt_vector, load_keyholder, reencrypt
from participant.local_update import NodeIdentity, local_update
from participant.owner_key import load_owner_key
from participant.pairwise_masks import PairwiseMasker, RoundMasks
from participant.rollout_owner import RolloutOwner, encrypted_rollout, owner_for, owner_update, tiled_theta
from protos import messages
from protos.codec import PROTOCOL_VERSION, check_version, encrypt_to_proto, from_proto, max_bytes_for
from protos.errors import ChunkLayoutError, FingerprintMismatchError, KeyFileError, RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.masking import STATS_STREAM, UPDATE_STREAM
from protos.optimizer import MASK_BOUND, STATE_NAMES
from protos.phase_timer import PhaseTimer, append_local_profile
from protos.profiles import get_profile
from protos.rollout_layout import BlockLayout
from protos.rollout_statistics import StatisticsLayout
from scenarios import Scenario

log = logging.getLogger(__name__)
P = TypeVar("P", bound=ProtoMessage)
# Integrity check: slots of q S + m (q < 2, |m| <= 2^15) of an aggregate within its bound (a few
# units per coordinate) stay below this; a value whose square could wrap the modulus does not.
INTEGRITY_VALUE_LIMIT = 1.5 * MASK_BOUND


@lru_cache(maxsize=4)
def cached_keyholder(key_dir: str, plaintext: bool, profile: str) -> KeyHolder:
    if plaintext:
        return PlainKeyHolder(get_profile(profile))
    if not key_dir:
        raise KeyFileError(
            "this participant has no key: start the SuperNode with --node-config "
            "'key-dir=\"/path/to/keys\"' (the directory holding participant.ctx)"
        )
    return load_keyholder(Path(key_dir))


@lru_cache(maxsize=4)
def cached_owner_key(key_dir: str, index: int, plaintext: bool, profile: str) -> KeyHolder:
    """Transition uploads: this owner's own key (``participant.owner_key``); the plaintext baseline has none."""
    if plaintext:
        return PlainKeyHolder(get_profile(profile))
    return load_owner_key(Path(key_dir), index, profile)


@lru_cache(maxsize=8)
def cached_masker(key_dir: str, index: int, fingerprint: str) -> PairwiseMasker:
    """This participant's roster entry and private key (``participant.pairwise_masks``)."""
    return PairwiseMasker.load(Path(key_dir), index, fingerprint)


def released_metrics(values: np.ndarray, round_: int) -> wire_pb2.ReleasedMetrics:
    """The federation's summed rollout statistics, released rounded (Li-Micciancio)."""
    total, episodes, steps = values
    episodes_i, steps_i = int(round(episodes)), int(round(steps))
    mean = round(total / episodes_i, 2) if episodes_i > 0 else 0.0
    return wire_pb2.ReleasedMetrics(
        round=round_, mean_return=mean, episodes=max(episodes_i, 0), steps=max(steps_i, 0), valid=episodes_i > 0
    )


def plausible_stats(values: np.ndarray, contributors: int, steps_per_participant: int) -> bool:
    """Summed [returns, episodes, steps] of honest participants: whole counts, at most one episode
    per step and at most ``steps_per_participant`` steps per contributor, and a finite return."""
    total, episodes, steps = (float(v) for v in values)
    whole = all(abs(v - round(v)) < 1e-3 for v in (episodes, steps))
    return (math.isfinite(total) and whole and -0.5 < episodes <= steps + 0.5
            and steps <= contributors * steps_per_participant + 0.5)


def refresh(
    holder: KeyHolder, request: wire_pb2.RefreshRequest, theta: np.ndarray | None, num_params: int
) -> wire_pb2.RefreshReply:
    """Client-aided bootstrapping: fresh ciphertexts of the still-masked state (and of theta, given only
    before round 1, when the coordinator holds none: HE-Adam only subtracts from theta, which needs no level)."""
    reply = wire_pb2.RefreshReply(protocol_version=PROTOCOL_VERSION, round=request.round)
    if theta is not None:
        reply.theta.CopyFrom(encrypt_to_proto(holder, theta))
    for name, masked in request.masked_state.items():
        reply.state[name].CopyFrom(reencrypt(holder, from_proto(holder, masked, expected_length=num_params)))
    return reply


@dataclass
class Exchange:
    """One coordinator message being answered: who answers, for which round, and the reply so far."""

    content: RecordDict
    scenario: Scenario
    identity: NodeIdentity
    run_id: int
    ledger: AnswerLedger
    holder: KeyHolder
    round: int
    participants: int
    num_params: int
    update_length: int  # values in this participant's update (theta's size, or tiled statistics)
    layout: BlockLayout | StatisticsLayout | None  # encrypted-rollout mode only
    masker: PairwiseMasker | None  # pairwise masking only
    reply: RecordDict
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    theta: np.ndarray | None = None

    def has(self, record: str) -> bool:
        return record in self.content.array_records

    def unpack(self, record: str, cls: type[P], max_bytes: int) -> P:
        return messages.unpack(self.content, record, cls, max_bytes=max_bytes)

    def own_key(self) -> KeyHolder:
        """Transition uploads: this owner's own key, under which its rollouts leave."""
        run = self.identity.run
        return cached_owner_key(self.identity.key_dir, self.identity.participant_index, run.plaintext, run.he_profile)

    def owner(self) -> RolloutOwner:
        """This owner's environments and uploaded rounds, kept for the run."""
        identity = self.identity
        return owner_for(self.scenario, identity.participant_index, identity.variant,
                         identity.randomness(self.round, "rollouts"), self.run_id)


def handle(
    content: RecordDict, identity: NodeIdentity, run_id: int, training: bool, ledger: AnswerLedger
) -> RecordDict:
    """Process one coordinator message and build the reply content.

    Requests are checked against the round's protocol before anything is decrypted
    (``participant.answer_rules``); every envelope is size-checked before parsing.
    """
    exchange = open_exchange(content, identity, run_id, ledger)
    if bool(messages.config_of(content).get("identify", False)):  # who answers: public roster facts only
        exchange.reply.config_records[messages.CONFIG].update(
            {"participant-index": identity.participant_index, "organization": identity.name})
        return exchange.reply
    exchange.theta = read_theta(exchange)
    for record, reply in REPLIES:
        if exchange.has(record):
            reply(exchange)
    if training:
        train(exchange)
    append_local_profile(identity.participant_index, exchange.round, exchange.timer)
    return exchange.reply


def open_exchange(content: RecordDict, identity: NodeIdentity, run_id: int, ledger: AnswerLedger) -> Exchange:
    """Check the key fingerprint and protocol version, and load this participant's keys."""
    config = messages.config_of(content)
    holder = cached_keyholder(identity.key_dir, identity.run.plaintext, identity.run.he_profile)
    if config.get("key-fingerprint") != holder.fingerprint:
        raise FingerprintMismatchError(
            f"coordinator uses key {str(config.get('key-fingerprint'))[:12]}…, this participant "
            f"has {holder.fingerprint[:12]}…: the two were given different key sets"
        )
    check_version(int(config.get("protocol-version", 0)), "coordinator message")
    round_, participants = int(config["round"]), max(1, int(config["participants"]))
    masker = None
    if identity.run.masking == "pairwise":  # before any work: a missing roster or key is a clear error
        masker = cached_masker(identity.key_dir, identity.participant_index, holder.fingerprint)
    reply_config = ConfigRecord(
        {"round": round_, "key-fingerprint": holder.fingerprint, "protocol-version": PROTOCOL_VERSION}
    )
    return Exchange(
        content=content,
        scenario=identity.plan.scenario,
        identity=identity,
        run_id=run_id,
        ledger=ledger,
        holder=holder,
        round=round_,
        participants=participants,
        num_params=identity.plan.num_params,
        update_length=identity.plan.update_length(holder.slots),
        layout=identity.plan.rollout_layout(holder.slots, participants) if identity.plan.rollouts else None,
        masker=masker,
        reply=RecordDict({messages.CONFIG: reply_config}),
    )


def read_theta(exchange: Exchange) -> np.ndarray | None:
    """The decrypted policy; before round 1 (``init``) the scenario's initial one; else None."""
    holder = exchange.holder
    if exchange.has(messages.THETA):
        msg = exchange.unpack(messages.THETA, wire_pb2.EncryptedVector, max_bytes_for(holder, exchange.num_params))
        with exchange.timer.phase("decrypt_theta"):
            return decrypt_vector(holder, from_proto(holder, msg, expected_length=exchange.num_params))
    if bool(messages.config_of(exchange.content).get("init", False)):
        return exchange.scenario.network(exchange.identity.run.mode).init(exchange.identity.run.seed)
    return None


def reply_refresh(exchange: Exchange) -> None:
    holder, num_params = exchange.holder, exchange.num_params
    limit = max_bytes_for(holder, num_params, len(STATE_NAMES))
    request = exchange.unpack(messages.REFRESH_REQUEST, wire_pb2.RefreshRequest, limit)
    check_refresh_request(request, exchange.round, exchange.ledger)
    with exchange.timer.phase("refresh"):
        # theta goes back only when the coordinator holds none yet (it sent none): before round 1
        fresh_theta = None if exchange.has(messages.THETA) else exchange.theta
        answer = refresh(holder, request, fresh_theta, num_params)
    if isinstance(exchange.layout, StatisticsLayout) and exchange.theta is not None:  # the coefficients T(theta)
        answer.theta_tiled.CopyFrom(tiled_theta(holder, exchange.theta, exchange.layout))
    exchange.reply[messages.REFRESH_REPLY] = messages.pack(answer)


def reply_norm_query(exchange: Exchange) -> None:
    limit = max_bytes_for(exchange.holder, exchange.holder.slots, exchange.participants)
    query = exchange.unpack(messages.NORM_QUERY, wire_pb2.NormQuery, limit)
    check_norm_query(query, exchange.round, exchange.participants, exchange.ledger)
    exchange.reply[messages.NORM_REPLY] = messages.pack(answer_norm_query(exchange.holder, query))


def reply_gradient_query(exchange: Exchange) -> None:
    holder, layout = exchange.holder, exchange.layout
    if layout is None:  # local-ppo: there is no encrypted gradient to collapse
        return
    query = exchange.unpack(messages.GRADIENT_QUERY, wire_pb2.GradientQuery,
                            max_bytes_for(holder, holder.slots, layout.gradient_vectors))
    check_gradient_query(query, exchange.round, layout.gradient_vectors, exchange.ledger)
    masked = [from_proto(holder, vec, expected_length=holder.slots) for vec in query.masked]
    dense = collapse_masked(holder, masked, layout)
    reply = wire_pb2.GradientReply(protocol_version=PROTOCOL_VERSION, round=exchange.round,
                                   gradient=dense)
    exchange.reply[messages.GRADIENT_REPLY] = messages.pack(reply)


def reply_owner_gradient(exchange: Exchange) -> None:
    """Transition uploads: the coordinator's sums of this owner's terms, under its own key, become its
    update: checked against its own gradient, clipped, masked and encrypted under the federation key."""
    layout = exchange.layout
    if not isinstance(layout, BlockLayout):  # only transition uploads have an owner's gradient
        return
    key = exchange.own_key()
    query = exchange.unpack(messages.OWNER_GRADIENT_QUERY, wire_pb2.GradientQuery,
                            max_bytes_for(key, key.slots, layout.gradient_vectors))
    check_gradient_query(query, exchange.round, layout.gradient_vectors, exchange.ledger, "owner-gradient")
    uploaded = exchange.owner().uploaded.pop(exchange.round, None)
    if uploaded is None:
        raise RequestRefusedError(f"this owner uploaded no rollouts in round {exchange.round}")
    owned, theta = uploaded
    units = exchange.identity.plan.units(exchange.participants)
    with exchange.timer.phase("owner_gradient"):
        per_slot = [from_proto(key, vec, expected_length=key.slots) for vec in query.masked]
        update = owner_update(key, per_slot, layout, owned, theta, exchange.scenario.poly_spec(),
                              units.clip * units.factor)
    with exchange.timer.phase("mask_encrypt"):
        masks = round_masks(exchange)
        exchange.reply[messages.UPDATE] = messages.pack(
            encrypted_update(exchange.holder, exchange.round, update, owned.stats, masks))


def reply_unmask(exchange: Exchange) -> None:
    """Double masking: open the shares of the other survivors' seeds, cancel pair masks with the dropped."""
    masker = exchange.masker
    if masker is None:  # masking is off: nothing to unmask
        return
    limit = 4096 + 512 * masker.size
    request = exchange.unpack(messages.UNMASK_REQUEST, wire_pb2.UnmaskRequest, limit)
    index = exchange.identity.participant_index
    check_unmask_request(request, exchange.round, index, exchange.identity.min_members, exchange.ledger)
    if request.dropped:
        log.info("round %d: the coordinator reports roster members %s missing; cancelling masks with them",
                 exchange.round, sorted(request.dropped))
    reply = wire_pb2.UnmaskReply(protocol_version=PROTOCOL_VERSION, round=exchange.round)
    for share in request.shares:
        try:
            reply.shares.append(masker.open_share(share, exchange.run_id, exchange.round))
        except RequestRefusedError as exc:  # the sender's seed then cannot be rebuilt: the sender is named
            log.warning("round %d: %s", exchange.round, exc)
    if request.dropped:
        masks = masker.round(exchange.run_id, exchange.round, exchange.ledger.members(exchange.round))
        dropped, holder = sorted(request.dropped), exchange.holder
        reply.update.CopyFrom(encrypt_to_proto(
            holder, masks.correction(dropped, UPDATE_STREAM, exchange.update_length)))
        reply.rollout_stats.CopyFrom(encrypt_to_proto(
            holder, masks.correction(dropped, STATS_STREAM, messages.STATS_LENGTH)))
    exchange.reply[messages.UNMASK_REPLY] = messages.pack(reply)


def reply_integrity(exchange: Exchange) -> None:
    """The aggregate's bound (only the sign of a masked, scaled difference) and the round's statistics."""
    holder = exchange.holder
    limit = (max_bytes_for(holder, holder.slots) + max_bytes_for(holder, exchange.num_params)
             + max_bytes_for(holder, messages.STATS_LENGTH))
    query = exchange.unpack(messages.INTEGRITY_QUERY, wire_pb2.IntegrityQuery, limit)
    check_integrity_query(query, exchange.round, exchange.ledger)
    masked = decrypt_vector(holder, from_proto(holder, query.masked_norm, expected_length=holder.slots))
    values = decrypt_vector(holder, from_proto(holder, query.masked_values, expected_length=exchange.num_params))
    require_masked(masked)
    require_masked(values)
    stats = decrypt_vector(holder, from_proto(holder, query.stats, expected_length=messages.STATS_LENGTH))
    steps = exchange.scenario.steps_per_round(exchange.identity.run.mode)
    within = bool(np.sum(masked) <= 0.0 and np.max(np.abs(values)) <= INTEGRITY_VALUE_LIMIT)
    reply = wire_pb2.IntegrityReply(
        protocol_version=PROTOCOL_VERSION, round=query.round, within_bound=within,
        stats_plausible=plausible_stats(stats, query.contributors, steps),
    )
    if reply.stats_plausible and exchange.identity.releases:
        reply.released.CopyFrom(released_metrics(stats, query.round))
    exchange.reply[messages.INTEGRITY_REPLY] = messages.pack(reply)


# What a message may ask besides training, in the order answered.
REPLIES: tuple[tuple[str, Callable[[Exchange], None]], ...] = (
    (messages.REFRESH_REQUEST, reply_refresh),
    (messages.NORM_QUERY, reply_norm_query),
    (messages.GRADIENT_QUERY, reply_gradient_query),
    (messages.OWNER_GRADIENT_QUERY, reply_owner_gradient),
    (messages.UNMASK_REQUEST, reply_unmask),
    (messages.INTEGRITY_QUERY, reply_integrity),
)


def train(exchange: Exchange) -> None:
    """Local training from theta: an encrypted update (local-ppo) or encrypted rollouts."""
    theta, round_, identity = exchange.theta, exchange.round, exchange.identity
    if theta is None:
        raise ChunkLayoutError(f"round-{round_} train message carries no theta and no init flag")
    holder, scenario, run_id = exchange.holder, exchange.scenario, exchange.run_id
    layout = exchange.layout
    if layout is None:
        with exchange.timer.phase("train"):
            update, stats = local_update(scenario, identity, run_id, theta, round_, exchange.participants)
    else:
        owner = exchange.owner()
        with exchange.timer.phase("train"):
            owned = owner.contribute(theta, identity.plan.units(exchange.participants))
        if isinstance(layout, BlockLayout):  # transitions: under this owner's own key; its update follows
            owner.uploaded = {round_: (owned, theta)}  # (reply_owner_gradient), only the latest round's
            with exchange.timer.phase("mask_encrypt"):
                exchange.reply[messages.ROLLOUT] = messages.pack(
                    encrypted_rollout(exchange.own_key(), round_, owned, layout, theta))
            return
        update, stats = owned.tiled_statistics(layout), owned.stats
    with exchange.timer.phase("mask_encrypt"):
        masks = round_masks(exchange)
        exchange.reply[messages.UPDATE] = messages.pack(encrypted_update(holder, round_, update, stats, masks))


def round_masks(exchange: Exchange) -> RoundMasks | None:
    """This round's masks over the masking set the coordinator named, once per round (None: masking off)."""
    masker = exchange.masker
    if masker is None:
        return None
    config = messages.config_of(exchange.content)
    members = check_members(list(config.get("members", [])), masker.index, masker.size, exchange.identity.min_members)
    exchange.ledger.claim("update", exchange.round)  # a round's pair masks never hide two different updates
    exchange.ledger.remember_members(exchange.round, members)
    return masker.round(exchange.run_id, exchange.round, members, exchange.identity.self_mask_threshold)


def encrypted_update(
    holder: KeyHolder, round_: int, update: np.ndarray, stats: np.ndarray, masks: RoundMasks | None = None
) -> wire_pb2.ParticipantUpdate:
    """The update and statistics ciphertexts, each plus this participant's pairwise mask if masking is on."""
    msg = wire_pb2.ParticipantUpdate(protocol_version=PROTOCOL_VERSION, round=round_)
    if masks is not None:
        update, stats = masks.mask(update, UPDATE_STREAM), masks.mask(stats, STATS_STREAM)
        msg.masking.CopyFrom(masks.metadata())
    msg.update.CopyFrom(encrypt_to_proto(holder, update))
    msg.rollout_stats.CopyFrom(encrypt_to_proto(holder, stats))
    return msg


def answer_norm_query(holder: KeyHolder, query: wire_pb2.NormQuery) -> wire_pb2.NormReply:
    """Key holder side of the masked-norm exchange (coordinator/robust_aggregation.py).

    Each ciphertext holds ``r_i * u_i^2 + m_i`` slot-wise: a secret factor and a zero-sum mask
    the coordinator chose. Only the slot sum ``r_i |u_i|^2`` is meaningful; it is released
    rounded to 4 significant digits (exact CKKS decryptions can leak the key).
    """
    reply = wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=query.round)
    for masked in query.masked:
        values = decrypt_vector(holder, from_proto(holder, masked, expected_length=holder.slots))
        require_masked(values)
        reply.masked_sums.append(round_significant(float(np.sum(values)), 4))
    return reply


def round_significant(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")

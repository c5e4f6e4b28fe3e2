"""One participant's work per message: decrypt theta, refresh if asked, train, encrypt the update.

Everything that leaves this module is a protobuf of ciphertexts plus the plaintext metadata in
the egress allowlist (``participant.audit``). Observations, actions, rewards, returns and the
update itself stay here; only rounded federation-level aggregates are ever released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from participant.attacks import (
    COLLUDING,
    DATA_ATTACKS,
    attacked_scenario,
    behaviour_for,
    clip_to,
    colluders_honest_updates,
    craft_update,
)
from participant.answer_rules import AnswerLedger, check_norm_query, check_refresh_request, require_masked
from participant.keyholder import KeyHolder, PlainKeyHolder, decrypt_vector, load_keyholder, reencrypt
from participant.ppo import ParticipantTrainer
from protos import messages
from protos.codec import PROTOCOL_VERSION, check_version, encrypt_vector, from_proto, max_bytes_for, to_proto
from protos.errors import ChunkLayoutError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.dp import dp_clip_bound
from protos.optimizer import STATE_NAMES, HEAdamConfig
from protos.profiles import get_profile
from scenarios import Scenario, load_scenario

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class NodeIdentity:
    """Node-local facts (from --node-config in deployments)."""

    participant_index: int
    key_dir: str
    variant: str | None
    scenario_ref: str
    plaintext: bool
    seed: int
    # Threat lab: from the run settings.
    party_mix: str = ""  # JSON override of the scenario's party mix
    collusion_dir: str = ""
    dp_noise_multiplier: float = 0.0
    he_profile: str = ""  # "": the scenario's
    total_rounds: int = 0  # the run's rounds (0: the scenario's), for the local lr schedule


@lru_cache(maxsize=4)
def cached_scenario(ref: str) -> Scenario:
    return load_scenario(ref)


@lru_cache(maxsize=4)
def cached_keyholder(key_dir: str, plaintext: bool, profile: str) -> KeyHolder:
    if plaintext:
        return PlainKeyHolder(get_profile(profile))
    if not key_dir:
        raise WireError(
            "this participant has no key: start the SuperNode with --node-config "
            "'key-dir=\"/path/to/keys\"' (the directory holding participant.ctx)"
        )
    return load_keyholder(Path(key_dir))


_trainers: dict[tuple, ParticipantTrainer] = {}


def trainer_for(identity: NodeIdentity, scenario: Scenario, run_id: int, round_: int) -> ParticipantTrainer:
    """Environments live as long as the process does, so episodes span rounds when possible.

    Deployed SuperNodes start a fresh ClientApp process per message: the round then enters the
    seed so each round still sees new episodes.
    """
    key = (run_id, identity.participant_index, identity.scenario_ref, identity.variant)
    if key not in _trainers:
        seed = identity.seed + 1000 * (identity.participant_index + 1) + 7919 * (round_ - 1)
        _trainers[key] = ParticipantTrainer(scenario, identity.participant_index, seed, identity.variant)
    return _trainers[key]


def clip_and_scale(update: np.ndarray, clip: float, weight: float, scale: float) -> np.ndarray:
    """L2-clip to C, apply the public weight and HE-Adam's pre-scale s."""
    norm = float(np.linalg.norm(update))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return update * (factor * weight * scale)


def released_metrics(holder: KeyHolder, stats: wire_pb2.EncryptedVector, round_: int) -> wire_pb2.ReleasedMetrics:
    """Decrypt the federation's summed rollout stats and release them rounded (Li-Micciancio)."""
    values = decrypt_vector(holder, from_proto(holder, stats, expected_length=messages.STATS_LENGTH))
    total, episodes, steps = values
    episodes_i, steps_i = int(round(episodes)), int(round(steps))
    mean = round(total / episodes_i, 2) if episodes_i > 0 else 0.0
    return wire_pb2.ReleasedMetrics(
        round=round_, mean_return=mean, episodes=max(episodes_i, 0), steps=max(steps_i, 0), valid=episodes_i > 0
    )


def refresh(holder: KeyHolder, request: wire_pb2.RefreshRequest, theta: np.ndarray | None, num_params: int) -> wire_pb2.RefreshReply:
    """Client-aided bootstrapping: fresh ciphertexts of theta and of the still-masked state."""
    reply = wire_pb2.RefreshReply(protocol_version=PROTOCOL_VERSION, round=request.round)
    if theta is not None:
        reply.theta.CopyFrom(to_proto(holder, encrypt_vector(holder, theta)))
    for name, masked in request.masked_state.items():
        fresh = reencrypt(holder, from_proto(holder, masked, expected_length=num_params))
        reply.state[name].CopyFrom(to_proto(holder, fresh))
    if request.HasField("stats_to_release"):
        reply.released.CopyFrom(released_metrics(holder, request.stats_to_release, request.stats_round))
    return reply


def handle(content: RecordDict, identity: NodeIdentity, run_id: int, training: bool, ledger: AnswerLedger) -> RecordDict:
    """Process one coordinator message and build the reply content.

    Requests are checked against the round's protocol before anything is decrypted
    (``participant.answer_rules``); every envelope is size-checked before parsing.
    """
    scenario = cached_scenario(identity.scenario_ref)
    config = messages.config_of(content)
    holder = cached_keyholder(identity.key_dir, identity.plaintext, identity.he_profile or scenario.he_profile)
    if config.get("key-fingerprint") != holder.fingerprint:
        raise WireError(
            f"coordinator uses key {str(config.get('key-fingerprint'))[:12]}…, this participant "
            f"has {holder.fingerprint[:12]}…: the two were given different key sets"
        )
    check_version(int(config.get("protocol-version", 0)), "coordinator message")
    round_, participants = int(config["round"]), max(1, int(config["participants"]))
    num_params = scenario.policy_spec().num_params

    theta = None
    if messages.THETA in content.array_records:
        msg = messages.unpack(content, messages.THETA, wire_pb2.EncryptedVector, max_bytes=max_bytes_for(holder, num_params))
        theta = decrypt_vector(holder, from_proto(holder, msg, expected_length=num_params))
    elif bool(config.get("init", False)):
        theta = scenario.policy_spec().init(identity.seed)
    reply = RecordDict(
        {messages.CONFIG: ConfigRecord({"round": round_, "key-fingerprint": holder.fingerprint, "protocol-version": PROTOCOL_VERSION})}
    )
    if messages.REFRESH_REQUEST in content.array_records:
        limit = max_bytes_for(holder, num_params, len(STATE_NAMES)) + max_bytes_for(holder, messages.STATS_LENGTH)
        request = messages.unpack(content, messages.REFRESH_REQUEST, wire_pb2.RefreshRequest, max_bytes=limit)
        check_refresh_request(request, round_, ledger)
        reply[messages.REFRESH_REPLY] = messages.pack(refresh(holder, request, theta, num_params))
    if messages.NORM_QUERY in content.array_records:
        limit = max_bytes_for(holder, holder.slots, participants)
        query = messages.unpack(content, messages.NORM_QUERY, wire_pb2.NormQuery, max_bytes=limit)
        check_norm_query(query, round_, participants, ledger)
        reply[messages.NORM_REPLY] = messages.pack(answer_norm_query(holder, query))
    if training:
        if theta is None:
            raise ChunkLayoutError(f"round-{round_} train message carries no theta and no init flag")
        reply[messages.UPDATE] = messages.pack(train(holder, scenario, identity, run_id, theta, round_, participants))
    return reply


def train(
    holder: KeyHolder, scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
) -> wire_pb2.ParticipantUpdate:
    """Train locally; the update is weighted 1/n for the n participants of the round."""
    adam = HEAdamConfig.for_scenario(scenario)
    behaviour = behaviour_for(scenario, identity.party_mix, identity.participant_index)
    weight = 1.0 / n
    if behaviour is not None and behaviour.attack in COLLUDING:
        honest = colluders_honest_updates(behaviour, attacked_scenario(scenario, behaviour), theta, round_, identity.seed,
                                          identity.variant, adam.clip_bound, identity.collusion_dir)
        update = craft_update(behaviour, honest[0], n=n, attacker_seed=identity.seed, colluder_updates=honest)
        return _encrypted_update(holder, round_, update * (weight * adam.update_scale), np.zeros(messages.STATS_LENGTH))
    result = trainer_for(identity, attacked_scenario(scenario, behaviour), run_id, round_).train(theta, round_, identity.total_rounds or None)
    stats = np.array([float(np.sum(result.episode_returns)), float(result.episodes), float(result.steps)])
    if behaviour is not None:  # malicious participants report no rollout stats
        no_stats = np.zeros(messages.STATS_LENGTH)
        if behaviour.attack in DATA_ATTACKS:  # data poisoners follow the protocol (clip, DP noise)
            return _encrypted_update(holder, round_, honest_update(result.update, adam, identity, weight, n), no_stats)
        seed = identity.seed * 1009 + identity.participant_index
        crafted = craft_update(behaviour, clip_to(result.update, adam.clip_bound), n=n, attacker_seed=seed)
        return _encrypted_update(holder, round_, crafted * (weight * adam.update_scale), no_stats)  # never clipped
    return _encrypted_update(holder, round_, honest_update(result.update, adam, identity, weight, n), stats)


def honest_update(update: np.ndarray, adam: HEAdamConfig, identity: NodeIdentity, weight: float, n: int) -> np.ndarray:
    """Clip to C (to C_dp under DP, plus this participant's share of the noise), weight, pre-scale."""
    z = identity.dp_noise_multiplier
    if z <= 0:
        return clip_and_scale(update, adam.clip_bound, weight, adam.update_scale)
    return dp_clip_and_noise(update, adam.clip_bound, z, n) * (weight * adam.update_scale)


def dp_clip_and_noise(update: np.ndarray, clip: float, z: float, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Distributed Gaussian noise: std z*C_dp/sqrt(n) here, so the federation's sum has std z*C_dp.

    The noise comes from OS entropy: nobody, this participant included, knows the total noise.
    """
    bound = dp_clip_bound(clip, z, n)
    rng = rng or np.random.default_rng()
    return clip_to(update, bound) + rng.normal(0.0, z * bound / np.sqrt(n), update.size)


def _encrypted_update(holder: KeyHolder, round_: int, update: np.ndarray, stats: np.ndarray) -> wire_pb2.ParticipantUpdate:
    return wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION,
        round=round_,
        update=to_proto(holder, encrypt_vector(holder, update)),
        rollout_stats=to_proto(holder, encrypt_vector(holder, stats)),
    )


def answer_norm_query(holder: KeyHolder, query: wire_pb2.NormQuery) -> wire_pb2.NormReply:
    """Key holder side of the masked-norm exchange (coordinator/robust.py).

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

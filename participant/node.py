"""One participant's work per message: decrypt theta, refresh if asked, train, encrypt the update.

Everything that leaves this module is a protobuf of ciphertexts plus the plaintext metadata in
``protos.messages.PERMITTED_CONFIG_KEYS``. Observations, actions, rewards, returns and the
update itself stay here; only rounded federation-level aggregates are ever released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from participant.keyholder import KeyHolder, PlainKeyHolder, decrypt_vector, load_keyholder, reencrypt
from participant.ppo import ParticipantTrainer
from protos import messages
from protos.codec import PROTOCOL_VERSION, encrypt_vector, from_proto, to_proto
from protos.errors import ChunkLayoutError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import HEAdamConfig
from protos.profiles import get_profile
from scenarios import Scenario, load_scenario

log = logging.getLogger(__name__)

STATS_LENGTH = 3  # [sum of episode returns, episodes, env steps]


@dataclass(frozen=True)
class NodeIdentity:
    """Node-local facts (from --node-config in deployments)."""

    participant_index: int
    key_dir: str
    variant: str | None
    scenario_ref: str
    plaintext: bool
    seed: int


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
    values = decrypt_vector(holder, from_proto(holder, stats, expected_length=STATS_LENGTH))
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


def handle(content: RecordDict, identity: NodeIdentity, run_id: int, training: bool) -> RecordDict:
    """Process one coordinator message and build the reply content."""
    scenario = cached_scenario(identity.scenario_ref)
    config = messages.config_of(content)
    holder = cached_keyholder(identity.key_dir, identity.plaintext, scenario.he_profile)
    if config.get("key-fingerprint") != holder.fingerprint:
        raise WireError(
            f"coordinator uses key {str(config.get('key-fingerprint'))[:12]}…, this participant "
            f"has {holder.fingerprint[:12]}…: the two were given different key sets"
        )
    round_ = int(config["round"])
    num_params = scenario.policy_spec().num_params

    theta = None
    if messages.THETA in content.array_records:
        msg = messages.unpack(content, messages.THETA, wire_pb2.EncryptedVector)
        theta = decrypt_vector(holder, from_proto(holder, msg, expected_length=num_params))
    elif round_ == 1 or bool(config.get("init", False)):
        theta = scenario.policy_spec().init(identity.seed)
    reply = RecordDict(
        {messages.CONFIG: ConfigRecord({"round": round_, "key-fingerprint": holder.fingerprint, "protocol-version": PROTOCOL_VERSION})}
    )
    if messages.REFRESH_REQUEST in content.array_records:
        request = messages.unpack(content, messages.REFRESH_REQUEST, wire_pb2.RefreshRequest)
        reply[messages.REFRESH_REPLY] = messages.pack(refresh(holder, request, theta, num_params))
    if training:
        if theta is None:
            raise ChunkLayoutError("train message without theta after round 1")
        reply[messages.UPDATE] = messages.pack(train(holder, scenario, identity, run_id, theta, round_, float(config["weight"])))
    return reply


def train(
    holder: KeyHolder, scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, weight: float
) -> wire_pb2.ParticipantUpdate:
    result = trainer_for(identity, scenario, run_id, round_).train(theta, round_)
    adam = HEAdamConfig.for_scenario(scenario)
    update = clip_and_scale(result.update, adam.clip_bound, weight, adam.update_scale)
    stats = np.array([float(np.sum(result.episode_returns)), float(result.episodes), float(result.steps)])
    return wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION,
        round=round_,
        update=to_proto(holder, encrypt_vector(holder, update)),
        rollout_stats=to_proto(holder, encrypt_vector(holder, stats)),
    )

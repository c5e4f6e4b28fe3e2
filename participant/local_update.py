"""One participant's contribution to a round: train locally, then put the update in update units.

Honest participants clip, add their DP noise share if the run uses DP, weight and pre-scale
(``protos.update_units``). In the threat lab, malicious participants (``participant.malicious``)
either poison their data and follow the protocol, or craft an update that is never clipped.
Observations, actions, rewards and the raw update never leave this module in the clear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from participant.malicious import (
    COLLUDING,
    DATA_ATTACKS,
    attacked_scenario,
    behaviour_for,
    colluders_honest_updates,
    craft_update,
)
from participant.ppo import ParticipantTrainer
from protos import messages
from protos.dp import dp_clip_and_noise
from protos.optimizer import HEAdamConfig
from protos.settings import RunSettings
from protos.update_units import UpdateUnits, clip_l2
from scenarios import Scenario

STATS_NONE = np.zeros(messages.STATS_LENGTH)  # malicious participants report no rollout statistics


@dataclass(frozen=True)
class NodeIdentity:
    """Who this participant is: node-local facts plus the run's resolved settings."""

    participant_index: int
    key_dir: str
    variant: str | None
    run: RunSettings  # resolved (``scenarios.resolve_run``): seed, rounds and profile filled in


_trainers: dict[tuple, ParticipantTrainer] = {}


def trainer_for(identity: NodeIdentity, scenario: Scenario, run_id: int, round_: int) -> ParticipantTrainer:
    """Environments live as long as the process does, so episodes span rounds when possible.

    Deployed SuperNodes start a fresh ClientApp process per message: the round then enters the
    seed so each round still sees new episodes.
    """
    key = (run_id, identity.participant_index, identity.run.scenario, identity.variant)
    if key not in _trainers:
        seed = identity.run.seed + 1000 * (identity.participant_index + 1) + 7919 * (round_ - 1)
        _trainers[key] = ParticipantTrainer(scenario, identity.participant_index, seed, identity.variant)
    return _trainers[key]


def local_update(
    scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(update in update units, rollout statistics [sum of returns, episodes, steps])."""
    run = identity.run
    adam = HEAdamConfig.for_scenario(scenario)
    units = UpdateUnits.of(adam, n)
    behaviour = behaviour_for(scenario, run.party_mix, identity.participant_index)
    if behaviour is not None and behaviour.attack in COLLUDING:
        honest = colluders_honest_updates(behaviour, attacked_scenario(scenario, behaviour), theta, round_, run.seed,
                                          identity.variant, adam.clip_bound, run.collusion_dir)
        crafted = craft_update(behaviour, honest[0], n=n, attacker_seed=run.seed, colluder_updates=honest)
        return units.encode_unclipped(crafted), STATS_NONE
    trainer = trainer_for(identity, attacked_scenario(scenario, behaviour), run_id, round_)
    result = trainer.train(theta, round_, run.num_server_rounds)
    if behaviour is not None and behaviour.attack not in DATA_ATTACKS:
        seed = run.seed * 1009 + identity.participant_index
        crafted = craft_update(behaviour, clip_l2(result.update, adam.clip_bound), n=n, attacker_seed=seed)
        return units.encode_unclipped(crafted), STATS_NONE  # never clipped
    if run.dp_noise_multiplier > 0:
        update = units.encode_unclipped(dp_clip_and_noise(result.update, adam.clip_bound, run.dp_noise_multiplier, n))
    else:
        update = units.encode(result.update)
    if behaviour is not None:  # data poisoners follow the protocol but report no statistics
        return update, STATS_NONE
    stats = np.array([float(np.sum(result.episode_returns)), float(result.episodes), float(result.steps)])
    return update, stats

"""One participant's contribution to a round: train locally, then put the update in update units.

An honest participant clips, adds its DP noise share if the run uses DP, weights and pre-scales
(``protos.update_units``). Observations, actions, rewards and the raw update never leave this
module in the clear. The node calls its ``UpdateSource``: in a deployment always ``honest_update``;
only `fedhe simulate` and the threat lab pass another (``fedhe/lab``), which this package never imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from participant.ppo import ParticipantTrainer
from participant.run_state import kept_for_run
from protos.dp import dp_clip_and_noise
from protos.plan import RunPlan
from protos.settings import RunSettings
from scenarios import Scenario

# What each draw of a node's private randomness is for (``NodeIdentity.randomness``).
STREAMS = {"ppo": 0, "dp": 1, "rollouts": 2}


class UpdateSource(Protocol):
    """(update in update units, rollout statistics [sum of returns, episodes, steps]) for one round."""

    def __call__(
        self, scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class NodeIdentity:
    """Who this participant is: node-local facts plus the run's plan (resolved once per process)."""

    participant_index: int
    key_dir: str
    variant: str | None
    plan: RunPlan  # the scenario, the resolved settings and what follows from them (``protos.plan``)
    seed: int | None = None  # the node policy's opt-in private seed; None: OS entropy
    update_source: UpdateSource | None = None  # None: ``honest_update``
    organization: str = ""  # the node's name in its replies ("": participant-<index>)
    min_members: int = 3  # the node's rule: never in a masked sum of fewer updates
    self_mask_threshold: int = 0  # shares that rebuild its self-mask seed; 0: protos.masking.default_threshold
    releases: bool = True  # whether this node decrypts and releases rounded federation statistics

    @property
    def run(self) -> RunSettings:
        return self.plan.settings

    @property
    def name(self) -> str:
        return self.organization or f"participant-{self.participant_index}"

    def randomness(self, round_: int, stream: str) -> np.random.SeedSequence:
        """This node's own randomness for ``stream`` in ``round_``: OS entropy, or derived from the node's
        private seed and its index. Never from the public run seed: whoever knows theta and the run's
        settings must not be able to re-run this participant's round and recover its update."""
        if self.seed is None:
            return np.random.SeedSequence()
        return np.random.SeedSequence([self.seed, self.participant_index, round_, STREAMS[stream]])


_trainers: dict[tuple, ParticipantTrainer] = {}


def trainer_for(identity: NodeIdentity, scenario: Scenario, run_id: int, round_: int) -> ParticipantTrainer:
    """This participant's trainer for the run, kept across rounds (``participant.run_state``)."""
    key = (run_id, identity.participant_index, identity.run.scenario, identity.variant)
    return kept_for_run(_trainers, key, lambda: ParticipantTrainer(
        scenario, identity.participant_index, identity.randomness(round_, "ppo"), identity.variant))


def local_update(
    scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """This node's update for the round, from its update source."""
    source = identity.update_source or honest_update
    return source(scenario, identity, run_id, theta, round_, n)


def honest_update(
    scenario: Scenario, identity: NodeIdentity, run_id: int, theta: np.ndarray, round_: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train, then clip (plus the DP noise share), weight and pre-scale; statistics of this round's episodes."""
    run, units = identity.run, identity.plan.units(n)
    result = trainer_for(identity, scenario, run_id, round_).train(theta, round_, run.num_server_rounds,
                                                                   prefetch=run.pipeline_rollouts)
    if run.dp_noise_multiplier > 0:
        rng = np.random.default_rng(identity.randomness(round_, "dp"))
        update = units.encode_unclipped(
            dp_clip_and_noise(result.update, units.clip, run.dp_noise_multiplier, n, rng)
        )
    else:
        update = units.encode(result.update)
    stats = np.array([float(np.sum(result.episode_returns)), float(result.episodes), float(result.steps)])
    return update, stats

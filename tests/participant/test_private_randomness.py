"""The recompute attack: whoever knows theta and the run's public settings re-runs a participant's local round.

Before, environment seeds and action sampling came from the public run seed, the participant index
and the round, so a replay recovered the update bit for bit. Now they come from the node's own
randomness (OS entropy, or a seed its policy keeps). Two honest updates from the same theta are
correlated anyway (the expected update is a public function of theta and the simulator: 0.3-0.9 on
CartPole), so the test compares the replay with an independent honest update, and checks that the
replay sees other episodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import participant.local_update as local_update
from participant.local_update import NodeIdentity, honest_update
from participant.ppo import ParticipantTrainer
from protos.optimizer import HEAdamConfig
from protos.plan import resolve_plan
from protos.settings import RunSettings
from protos.update_units import UpdateUnits

PLAN = resolve_plan(RunSettings(scenario="cartpole", seed=0))
SCENARIO, RUN = PLAN.scenario, PLAN.settings
THETA = SCENARIO.network(RUN.mode).init(RUN.seed)  # public: the coordinator's initial policy
UNITS = UpdateUnits.of(HEAdamConfig.of(SCENARIO.server), 3)
INDEX, ROUND = 0, 1


@pytest.fixture(autouse=True)
def fresh_trainers(monkeypatch):
    monkeypatch.setattr(local_update, "_trainers", {})


def public_seed(round_: int) -> int:
    """What the old code seeded a participant's trainer with: all of it public."""
    return RUN.seed + 1000 * (INDEX + 1) + 7919 * (round_ - 1)


def replay() -> np.ndarray:
    """The attacker: the participant's round, re-run from public data only, exactly as the old code ran it."""
    trainer = ParticipantTrainer(SCENARIO, INDEX, public_seed(ROUND))
    try:
        return UNITS.encode(trainer.train(THETA, ROUND, RUN.num_server_rounds).update)
    finally:
        trainer.close()


def true_update(run_id: int, seed: int | None = None, run: RunSettings = RUN) -> np.ndarray:
    """The participant's update as its node computes it (a new run id: a new trainer, as in a new process)."""
    identity = NodeIdentity(INDEX, "", None, dataclasses.replace(PLAN, settings=run), seed)
    return honest_update(SCENARIO, identity, run_id, THETA, ROUND, 3)[0]


def test_a_replay_from_the_seed_material_is_bit_for_bit():
    """Not vacuous: knowing the seed material reproduces a round exactly, so secrecy of the seed is what protects
    it. The old seed material was public; a node's opt-in seed is not (DP noise included)."""
    np.testing.assert_array_equal(replay(), replay())
    with_dp = dataclasses.replace(RUN, dp_noise_multiplier=1.0)
    node = true_update(1, seed=1234, run=with_dp)
    np.testing.assert_array_equal(node, true_update(2, seed=1234, run=with_dp))  # who knows the seed replays it
    assert not np.array_equal(node, true_update(3, seed=1235, run=with_dp))
    assert not np.array_equal(true_update(4, seed=1234), replay())  # the node's seed is not the run's


def test_under_default_settings_a_replay_is_no_closer_than_an_independent_honest_update():
    target, trials = replay(), 6
    truths = [true_update(10 + k) for k in range(trials)]
    independent = [true_update(100 + k) for k in range(trials)]
    assert not any(np.array_equal(u, target) for u in truths)
    to_replay = np.mean([np.linalg.norm(u - target) for u in truths])
    to_independent = np.mean([np.linalg.norm(u - v) for u, v in zip(truths, independent)])
    corr_replay = np.mean([np.corrcoef(u, target)[0, 1] for u in truths])
    corr_independent = np.mean([np.corrcoef(u, v)[0, 1] for u, v in zip(truths, independent)])
    print(f"\nrecompute attack, {trials} trials: mean |u - replay| {to_replay:.4f}, mean |u - independent| "
          f"{to_independent:.4f} (|u| ~ {np.mean([np.linalg.norm(u) for u in truths]):.4f}); mean correlation "
          f"with the replay {corr_replay:.3f}, with an independent update {corr_independent:.3f}")
    assert to_replay >= 0.5 * to_independent


def test_the_replay_sees_other_episodes_than_the_participant():
    """The private data: the initial observations of the episodes (each environment's reset) the participant trains
    on, against those the replay sees, over 200 rounds of 8 environments (6400 values)."""
    def reset_observations(seed_of) -> np.ndarray:
        seen = []
        for round_ in range(1, 201):
            trainer = ParticipantTrainer(SCENARIO, INDEX, seed_of(round_))
            seen.append(trainer.collector.obs.copy())
            trainer.close()
        return np.concatenate(seen).ravel()

    node = NodeIdentity(INDEX, "", None, PLAN)
    participant = reset_observations(lambda round_: node.randomness(round_, "ppo"))
    replayed = reset_observations(public_seed)
    corr = float(np.corrcoef(participant, replayed)[0, 1])
    print(f"\ncorrelation of the participant's and the replay's initial observations over {participant.size} "
          f"values: {corr:.4f}")
    assert abs(corr) <= 0.05
    seeded = NodeIdentity(INDEX, "", None, PLAN, seed=7)  # who knows a node's seed sees its very episodes
    first, again = (ParticipantTrainer(SCENARIO, INDEX, seeded.randomness(ROUND, "ppo")) for _ in range(2))
    np.testing.assert_array_equal(first.collector.obs, again.collector.obs)

"""The one evaluation episode loop (scenarios.rollout.play_episodes): action casting, seeding, callbacks."""

from __future__ import annotations

import numpy as np
import pytest

from scenarios import Policy, Scenario, load_scenario
from scenarios.rollout import Step, choose_actions, env_action, evaluate_policy, play_episodes


def policy(name: str, seed: int = 0) -> tuple[Scenario, Policy]:
    sc = load_scenario(name)
    spec = sc.policy_spec()
    return sc, Policy(spec, spec.init(seed))


def test_discrete_actions_are_python_ints():
    sc, pol = policy("cartpole")
    env = sc.build_env(0, 0)
    steps: list[Step] = []
    play_episodes(env, choose_actions(env.action_space, pol, 0), 1, 0, on_step=steps.append)
    assert steps and all(type(s.action) is int for s in steps)
    assert env_action(env.action_space, np.array(1)) == 1


def test_continuous_actions_are_clipped_and_stay_float64():
    sc, pol = policy("pendulum")
    env = sc.build_env(0, 0)
    space = env.action_space
    assert env_action(space, np.array([5.0])).tolist() == [2.0]
    assert env_action(space, np.array([-0.3])).dtype == np.float64  # as in training, not the space's float32
    steps: list[Step] = []
    play_episodes(env, choose_actions(space, pol, 0, greedy=False), 1, 0, on_step=steps.append, max_steps=50)
    actions = np.stack([s.action for s in steps])
    assert actions.dtype == np.float64 and np.all(np.abs(actions) <= 2.0)


@pytest.mark.parametrize("name, greedy", [("cartpole", True), ("pendulum", False)])
def test_seeds_give_reproducible_returns(name, greedy):
    sc, pol = policy(name, 1)
    env = sc.build_env(0, 0)

    def run(seed: int) -> list[float]:
        return play_episodes(env, choose_actions(env.action_space, pol, seed, greedy), 2, seed)

    assert run(3) == run(3) == evaluate_policy(env, pol, 2, 3, greedy=greedy)
    assert run(3) != run(4)


def test_random_mode_is_seeded_once():
    sc, _ = policy("cartpole")
    env = sc.build_env(0, 0)

    def actions(seed: int, calls: int) -> list[int]:
        seen: list[int] = []
        act = choose_actions(env.action_space, None, seed)
        for k in range(calls):  # one seeding, however the episodes are split into calls
            play_episodes(env, act, 2 // calls, 10 + k * (2 // calls), on_step=lambda s: seen.append(int(s.action)))
        return seen

    assert actions(5, 1) == actions(5, 1) == actions(5, 2)
    assert actions(5, 1) != actions(6, 1)


def test_steps_chain_infos_and_max_steps_cuts_episodes():
    sc, pol = policy("cartpole")
    env = sc.build_env(0, 0)
    steps: list[Step] = []
    returns = play_episodes(env, choose_actions(env.action_space, pol, 0), 2, 0, on_step=steps.append, max_steps=5)
    assert len(steps) == 10 and returns == [5.0, 5.0]
    assert steps[1].info is steps[0].next_info
    assert sum(s.reward for s in steps[:5]) == returns[0]

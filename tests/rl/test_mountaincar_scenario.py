"""The sparse-reward built-in (MountainCar-v0): it resolves, its environments step with the raw -1 reward,
its observations are standardized so both modes see [-1, 1], and its exploration aids (a 1000-step limit,
sticky actions) leave the reward alone."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from scenarios import list_scenarios, load_scenario
from scenarios.builtin import MOUNTAINCAR_OBS_MEAN, MOUNTAINCAR_OBS_STD

ROLLOUTS = "encrypted-rollouts"


def test_mountaincar_is_a_builtin_with_the_gymnasium_threshold():
    scenario = load_scenario("mountaincar")
    assert "mountaincar" in dict(list_scenarios())
    assert scenario.reward_threshold == gym.spec("MountainCar-v0").reward_threshold == -110.0
    spec = scenario.policy_spec()
    assert (spec.obs_dim, spec.action_kind, spec.action_dim) == (2, "discrete", 3)
    poly = scenario.network(ROLLOUTS)
    assert (poly.obs_dim, poly.num_outputs, poly.continuous) == (2, 3, False)


def test_every_observation_scaled_by_obs_scale_fits_the_unit_box():
    """The observation box's corners map to exactly -1 and 1, so no observation is ever clipped."""
    scenario = load_scenario("mountaincar")
    raw = gym.make("MountainCar-v0").observation_space
    mean, std = np.array(MOUNTAINCAR_OBS_MEAN), np.array(MOUNTAINCAR_OBS_STD)
    np.testing.assert_allclose((raw.low - mean) / std, [-1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose((raw.high - mean) / std, [1.0, 1.0], atol=1e-6)
    scale = scenario.rollout_obs_scale()
    env = scenario.build_env(0, 0)
    assert np.all(env.observation_space.low / scale >= -1.0) and np.all(env.observation_space.high / scale <= 1.0)
    theta = scenario.network(ROLLOUTS).init(0)
    policy = scenario.make_policy(ROLLOUTS, theta)
    rng = np.random.default_rng(0)
    seen = []
    try:
        obs, _ = env.reset(seed=3)
        for _ in range(300):
            seen.append(obs)
            obs, *_ = env.step(int(rng.integers(3)))
    finally:
        env.close()
    seen = np.array(seen)
    assert np.all(np.abs(seen / scale) <= 1.0)
    np.testing.assert_array_equal(policy.features(seen), seen / scale)  # scaled, never clipped


def test_mountaincar_steps_with_the_raw_reward_and_standardized_observations():
    """Same seed and actions on MountainCar-v0 with the same exploration aids (a 1000-step limit, Gymnasium's
    StickyAction): observations differ only by the fixed affine map, every reward is the environment's own -1."""
    scenario = load_scenario("mountaincar")
    sticky = scenario.env_kwargs["sticky_actions"]
    assert 0 < sticky <= 0.5  # an aid: the agent's own choice acts at least half the time
    wrapped = scenario.build_env(0, 0)
    bare = gym.wrappers.StickyAction(gym.make("MountainCar-v0", max_episode_steps=1000), sticky)
    mean, std = np.array(MOUNTAINCAR_OBS_MEAN), np.array(MOUNTAINCAR_OBS_STD)
    rng = np.random.default_rng(1)
    try:
        obs, _ = wrapped.reset(seed=5)
        raw, _ = bare.reset(seed=5)
        np.testing.assert_allclose(obs, (raw - mean) / std)
        for _ in range(150):
            action = int(rng.integers(3))
            obs, reward, terminated, truncated, _ = wrapped.step(action)
            raw, raw_reward, *_ = bare.step(action)
            np.testing.assert_allclose(obs, (raw - mean) / std)
            assert reward == raw_reward == -1.0 and not (terminated or truncated)
    finally:
        wrapped.close()
        bare.close()


def test_the_episode_limit_is_longer_than_mountaincar_v0s():
    """The exploration aid: an episode that never reaches the goal is cut after 1000 steps, not 200."""
    env = load_scenario("mountaincar").build_env(0, 0)
    try:
        env.reset(seed=0)
        steps, total, truncated = 0, 0.0, False
        while not truncated:
            _, reward, terminated, truncated, _ = env.step(1)  # never push: never reaches the goal
            assert not terminated
            steps, total = steps + 1, total + reward
    finally:
        env.close()
    assert steps == 1000 and total == -1000.0

"""Local PPO: GAE, truncation bootstrap, determinism, update conventions and a learning check."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from participant.ppo import LocalResult, ParticipantTrainer
from scenarios import Policy, PPOConfig, Scenario, load_scenario
from scenarios.rollout import RolloutCollector, compute_gae, evaluate_policy

SMALL = PPOConfig(num_envs=2, steps_per_env=32, epochs=2, minibatches=2)


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.5
    rewards = np.array([[1.0], [2.0], [3.0]])
    values = np.array([[0.5], [1.0], [1.5]])
    dones = np.array([[False], [True], [False]])
    last_value = np.array([2.0])
    adv, ret = compute_gae(rewards, values, dones, last_value, gamma, lam)
    d2 = 3.0 + 0.9 * 2.0 - 1.5          # 3.3, bootstraps from last_value
    d1 = 2.0 - 1.0                      # 1.0, episode ended: no V(s_2)
    d0 = 1.0 + 0.9 * 1.0 - 0.5          # 1.4
    expected = np.array([[d0 + 0.45 * d1], [d1], [d2]])
    np.testing.assert_allclose(adv, expected)
    np.testing.assert_allclose(ret, expected + values)


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    dones = np.zeros((5, 3), dtype=bool)
    last = rng.standard_normal(3)
    adv, _ = compute_gae(rewards, values, dones, last, 0.95, 1.0)
    mc = last.copy()
    for t in range(4, -1, -1):
        mc = rewards[t] + 0.95 * mc
        np.testing.assert_allclose(adv[t], mc - values[t])


def _constant_value_theta(scenario: Scenario, value: float) -> np.ndarray:
    spec = scenario.policy_spec()
    theta = spec.init(0)
    params = spec.unflatten(theta)
    for w, b in params.critic:
        w[...] = 0.0
        b[...] = 0.0
    params.critic[-1][1][...] = value
    return theta


def test_truncation_bootstraps_and_termination_does_not():
    make = lambda index, seed: gym.make("CartPole-v1", max_episode_steps=10)  # noqa: E731
    sc = Scenario(name="short", make_env=make, ppo=PPOConfig(num_envs=4))
    collector = RolloutCollector(sc.build_vector_env(0, 0), seed=0)
    theta = _constant_value_theta(sc, 10.0)
    sc.policy_spec().unflatten(theta).actor[-1][1][...] = [2.0, -2.0]  # mostly push left: falls in ~10 steps
    policy = Policy(sc.policy_spec(), theta)
    rollout = collector.collect(policy, 60, np.random.default_rng(0), gamma=0.9, reward_scale=0.5)
    truncated_steps = np.isclose(rollout.rewards, 0.5 + 0.9 * 10.0)
    plain_steps = np.isclose(rollout.rewards, 0.5)
    assert np.all(truncated_steps | plain_steps)
    assert truncated_steps.any() and np.all(rollout.dones[truncated_steps])
    assert (rollout.dones & plain_steps).any(), "expected some real terminations too"
    assert len(rollout.episode_returns) == rollout.dones.sum()
    assert all(r <= 10 for r in rollout.episode_returns)  # returns stay raw (unscaled, no bootstrap)


def test_episodes_continue_across_rounds():
    sc = Scenario(name="c", env_id="CartPole-v1", ppo=PPOConfig(num_envs=1, steps_per_env=5, epochs=1, minibatches=1))
    trainer = ParticipantTrainer(sc, 0, seed=0)
    theta = sc.policy_spec().init(0)
    first = trainer.collector.obs.copy()
    trainer.train(theta, 0)
    assert not np.array_equal(trainer.collector.obs, first)  # no reset between rounds
    lengths = [r for k in range(20) for r in trainer.train(theta, k + 1).episode_returns]
    assert lengths and sum(lengths) <= 5 * 21  # every counted step belongs to a real episode
    trainer.close()


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])
def test_training_is_deterministic_given_seeds(name):
    sc = load_scenario(name).with_overrides(ppo=SMALL)
    theta = sc.policy_spec().init(1)

    def two_rounds(seed: int) -> list[LocalResult]:
        trainer = ParticipantTrainer(sc, 1, seed)
        results = [trainer.train(theta, 0), trainer.train(theta, 1)]
        trainer.close()
        return results

    a, b, c = two_rounds(3), two_rounds(3), two_rounds(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.update, y.update)
        assert x.episode_returns == y.episode_returns
    assert not np.array_equal(a[0].update, c[0].update)


def test_pseudo_gradient_is_theta_in_minus_theta_out():
    sc = load_scenario("cartpole").with_overrides(ppo=SMALL)
    theta = sc.policy_spec().init(0)
    before = theta.copy()
    result = ParticipantTrainer(sc, 0, 0).train(theta, 0)
    np.testing.assert_array_equal(theta, before)  # caller's vector untouched
    assert result.update.shape == theta.shape and np.linalg.norm(result.update) > 0
    assert result.steps == SMALL.batch_size and result.episodes == len(result.episode_returns)
    # Adam moves each coordinate at most ~lr per step, epochs * minibatches steps in total
    assert np.abs(result.update).max() <= SMALL.lr * SMALL.epochs * SMALL.minibatches * 1.01


def test_gradient_mode_returns_the_ppo_gradient_at_theta_in():
    sc = load_scenario("cartpole").with_overrides(ppo=SMALL, update="gradient")
    theta = sc.policy_spec().init(0)
    grad = ParticipantTrainer(sc, 0, 0).train(theta, 0).update
    # Same rollout, re-collected by an identically seeded trainer, gives the same gradient.
    again = ParticipantTrainer(sc, 0, 0).train(theta, 0).update
    np.testing.assert_array_equal(grad, again)
    # At theta_in every ratio is 1, so no clipping: the actor gradient is the policy gradient (nonzero).
    assert np.linalg.norm(grad) > 0
    pseudo = ParticipantTrainer(sc.with_overrides(update="pseudo-gradient"), 0, 0).train(theta, 0).update
    cos = grad @ pseudo / (np.linalg.norm(grad) * np.linalg.norm(pseudo))
    assert cos > 0.2  # a descent direction agrees with where local training went


def test_continuous_actions_are_clipped_only_when_stepping():
    sc = load_scenario("pendulum").with_overrides(ppo=SMALL)
    spec = sc.policy_spec()
    theta = spec.init(0)
    spec.unflatten(theta).log_std[...] = np.log(2.0)  # wide Gaussian: many samples beyond +-2
    trainer = ParticipantTrainer(sc, 0, 0)
    rollout = trainer.collector.collect(Policy(spec, theta), 32, trainer.rng, 0.99, 1.0)
    assert np.abs(rollout.actions).max() > 2.0
    np.testing.assert_allclose(rollout.log_probs, Policy(spec, theta).log_prob(
        rollout.obs.reshape(-1, 3), rollout.actions.reshape(-1, 1)).reshape(rollout.log_probs.shape))
    trainer.close()


def test_cartpole_learns_in_a_few_rounds():
    """Single participant applying its own pseudo-gradient: ~20 -> > 100 in 15 rounds."""
    sc = load_scenario("cartpole")
    spec = sc.policy_spec()
    theta = spec.init(0)
    trainer = ParticipantTrainer(sc, 0, seed=0)
    first = trainer.train(theta, 0)
    for k in range(1, 15):
        theta = theta - trainer.train(theta, k).update
    last = trainer.train(theta, 15)
    trainer.close()
    assert np.mean(first.episode_returns) < 40
    assert np.mean(last.episode_returns) > 100
    env = sc.build_env(0, 0)
    assert np.mean(evaluate_policy(env, Policy(spec, theta), episodes=3, seed=0)) > 100


def _small_cartpole() -> Scenario:
    return load_scenario("cartpole").with_overrides(ppo=SMALL)


def test_a_pipelined_round_learns_from_the_theta_before_on_rollouts_collected_in_the_background():
    """Round 2 of a pipelined trainer is PPO from theta_2 on rollouts that theta_1 collected while round 1's
    update was away; a round after one the participant sat out collects afresh; the last round prefetches
    nothing."""
    scenario = _small_cartpole()
    theta1 = scenario.policy_spec().init(0)
    theta2, theta4 = theta1 + 0.01, theta1 - 0.02
    pipelined, reference = ParticipantTrainer(scenario, 0, 7), ParticipantTrainer(scenario, 0, 7)
    try:
        first = pipelined.train(theta1, 1, total_rounds=4, prefetch=True)
        np.testing.assert_array_equal(first.update, reference.train(theta1, 1, total_rounds=4).update)
        second = pipelined.train(theta2, 2, total_rounds=4, prefetch=True)
        reference._round, reference._lr = 2, pipelined._lr
        expected = reference._learn(theta2, reference._collect(theta1))
        np.testing.assert_array_equal(second.update, expected.update)
        assert second.episode_returns == expected.episode_returns
        # Round 3 skipped: the rollouts theta_2 collected for it are dropped, round 4 collects with theta_4.
        fourth = pipelined.train(theta4, 4, total_rounds=4, prefetch=True)
        reference._collect(theta2)
        np.testing.assert_array_equal(fourth.update, reference.train(theta4, 4, total_rounds=4).update)
        assert pipelined._prefetch is None  # the last round
    finally:
        pipelined.close()
        reference.close()


def test_a_background_collection_that_fails_fails_the_round_it_was_for():
    class BreaksLater(gym.Wrapper):
        steps = 0

        def step(self, action):
            BreaksLater.steps += 1
            if BreaksLater.steps > 2 * SMALL.steps_per_env:  # round 1 (2 envs x 32 steps) works
                raise RuntimeError("simulator crashed")
            return self.env.step(action)

    scenario = Scenario(name="breaks", make_env=lambda i, s: BreaksLater(gym.make("CartPole-v1")), ppo=SMALL)
    trainer = ParticipantTrainer(scenario, 0, 1)
    theta = scenario.policy_spec().init(0)
    try:
        trainer.train(theta, 1, total_rounds=3, prefetch=True)
        with pytest.raises(RuntimeError, match="the environment failed"):
            trainer.train(theta, 2, total_rounds=3, prefetch=True)
    finally:
        trainer.close()

"""The data owner's side of encrypted-rollout training: deltas, clipping, fixed-size uploads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coordinator.encrypted_gradient import block_gradient
from participant.rollout_owner import ROLLOUTS, RolloutOwner, a2c_deltas, clip_factors
from protos.backend import PlainBackend
from protos.optimizer import HEAdamConfig
from protos.profiles import get_profile
from protos.rollout_layout import layout_for_round
from protos.rollout_statistics import StatisticsLayout
from protos.update_units import UpdateUnits
from scenarios import load_scenario

SLOTS = 8192


def small(name: str):
    scenario = load_scenario(name)
    return scenario.with_overrides(rollout=dataclasses.replace(scenario.rollout, num_envs=2, steps_per_env=64))


def a2c_loss(policy, obs, actions, adv, returns, vf_coef, theta):
    """The loss whose loss-layer deltas the owner computes (discrete actions)."""
    policy.theta = theta
    logits, values = policy.forward(obs)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    t = len(obs)
    return -np.sum(adv * logp[np.arange(t), actions]) / t + vf_coef * np.sum((values - returns) ** 2) / (2 * t)


def test_deltas_backpropagate_to_the_a2c_loss_gradient():
    scenario = small("acrobot")  # three actions
    spec = scenario.poly_spec()
    theta = spec.init(1) * 5
    policy = scenario.make_policy(ROLLOUTS, theta)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (40, spec.obs_dim))
    actions, adv, returns = rng.integers(0, 3, 40), rng.normal(size=40), rng.normal(size=40)
    values = policy.forward(obs)[1]
    d_actor, d_critic, d_log_std = a2c_deltas(policy, obs, actions, adv, values, returns, 0.5)
    assert d_log_std is None  # discrete actions have no spread
    grad = spec.gradient(theta, obs, d_actor, d_critic)
    eps, numeric = 1e-6, np.zeros_like(theta)
    for k in range(theta.size):
        step = np.zeros_like(theta)
        step[k] = eps
        numeric[k] = (a2c_loss(policy, obs, actions, adv, returns, 0.5, theta + step)
                      - a2c_loss(policy, obs, actions, adv, returns, 0.5, theta - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])  # discrete and continuous (Gaussian mean)
def test_uploads_are_bounded_fixed_size_and_collapse_to_the_clipped_gradient(name):
    scenario = small(name)
    spec, config = scenario.poly_spec(), HEAdamConfig.of(scenario.rollout.server)
    layout = layout_for_round(scenario, SLOTS, 3)
    statistics = StatisticsLayout(spec, SLOTS)
    owner = RolloutOwner(scenario, 0, seed=0)
    theta = spec.init(0)
    for _ in range(2):
        result = owner.contribute(theta, UpdateUnits.of(config, 3))
        blocks = result.blocks(layout)
        assert len(blocks) == layout.blocks_for(scenario.rollout.transitions)
        assert all(len(block) == layout.block_vectors for block in blocks)
        states = np.concatenate([block[: spec.obs_dim] for block in blocks], axis=1)
        assert np.max(np.abs(states)) <= scenario.rollout.obs_clip
        # The coordinator's per-slot products, collapsed, are this owner's weighted, clipped gradient.
        per_slot = sum(np.stack(plain_block_gradient(layout, theta, block)) for block in blocks)
        gradient = layout.collapse(list(per_slot)) / UpdateUnits.of(config, 3).factor
        assert np.max(np.abs(gradient)) <= config.clip_bound * (1 + 1e-9)
        assert result.stats[2] == scenario.rollout.transitions
        # The statistics upload: one fixed-size vector whose terms, times the coefficients, sum to the same.
        tiled = result.tiled_statistics(statistics)
        assert tiled.shape == (statistics.upload_length,)
        products = tiled * np.concatenate(statistics.pack_theta(theta))
        from_statistics = statistics.collapse(list(products.reshape(statistics.gradient_vectors, SLOTS)))
        expected = spec.gradient(theta, result.obs, result.d_actor, result.d_critic, result.d_log_std)
        np.testing.assert_allclose(from_statistics, expected, atol=1e-12)
        assert np.max(np.abs(from_statistics)) / UpdateUnits.of(config, 3).factor <= config.clip_bound * (1 + 1e-9)
    owner.close()


def test_continuous_deltas_backpropagate_to_the_gaussian_a2c_loss_including_the_learned_spread():
    scenario = small("pendulum")
    spec = scenario.poly_spec()
    theta = spec.init(2) + np.random.default_rng(3).normal(scale=0.2, size=spec.num_params)
    policy = scenario.make_policy(ROLLOUTS, theta)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (30, spec.obs_dim))
    actions = policy.center + policy.scale * rng.normal(size=(30, spec.num_outputs))
    adv, returns = rng.normal(size=30), rng.normal(size=30)
    values = policy.forward(obs)[1]
    d_actor, d_critic, d_log_std = a2c_deltas(policy, obs, actions, adv, values, returns, 0.5)
    grad = spec.gradient(theta, obs, d_actor, d_critic, d_log_std)

    def loss(th):
        p = scenario.make_policy(ROLLOUTS, th)
        mean, v = p.forward(obs)
        std = spec.std(th)
        logp = -0.5 * (((p.unit_actions(actions) - mean) / std) ** 2 + np.log(2 * np.pi * std**2)).sum(axis=1)
        return -np.mean(adv * logp) + 0.5 * np.mean((v - returns) ** 2) / 2

    eps = 1e-6
    numeric = np.array([(loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)])
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    assert spec.unpack(grad)["actor_log_std"].any()  # the spread is trained


def test_clip_factors_bound_each_network_separately():
    spec = load_scenario("cartpole").poly_spec()
    n_actor = spec.num_params - (spec.hidden * (spec.obs_dim + 2) + 1)
    gradient = np.zeros(spec.num_params)
    gradient[0], gradient[n_actor] = 0.5, 8.0  # a small actor coordinate, a large critic coordinate
    fa, fc = clip_factors(spec, gradient, 2.0)
    assert fa == 1.0 and fc == 0.25


def plain_block_gradient(layout, theta, block):
    """The coordinator's computation in plaintext (the same code path as on ciphertexts)."""
    return block_gradient(PlainBackend(get_profile("n16k-d6")), layout.pack_theta(theta), list(block), layout)

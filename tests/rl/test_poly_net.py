"""The polynomial actor-critic of encrypted-rollout training: shapes, init bound, backprop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scenarios.poly_net import PARAM_NAMES, PolyNetSpec


def _objective(spec, theta, obs, d_actor, d_critic):
    outputs, values = spec.forward(theta, obs)
    return float(np.sum(d_actor * outputs) + np.sum(d_critic * values))


@pytest.mark.parametrize(
    "spec", [PolyNetSpec(5, 7, 3), PolyNetSpec(3, 6, 2, continuous=True)], ids=["discrete", "gauss"]
)
def test_gradient_matches_finite_differences(spec):
    rng = np.random.default_rng(1)
    theta = spec.init(0) + rng.normal(scale=0.3, size=spec.num_params)  # biases and outputs nonzero
    obs = rng.uniform(-1, 1, size=(11, spec.obs_dim))
    d_actor, d_critic = rng.normal(size=(11, spec.num_outputs)), rng.normal(size=11)
    grad = spec.gradient(theta, obs, d_actor, d_critic)
    eps, numeric = 1e-6, np.zeros(spec.num_params)
    for i in range(spec.num_params):
        step = np.zeros(spec.num_params)
        step[i] = eps
        plus, minus = (_objective(spec, theta + sign * step, obs, d_actor, d_critic) for sign in (1, -1))
        numeric[i] = (plus - minus) / (2 * eps)
    assert np.max(np.abs(grad - numeric)) <= 1e-7 * max(1.0, np.max(np.abs(numeric)))


def test_layout_sizes_order_and_views():
    spec = PolyNetSpec(4, 16, 2)
    assert spec.num_params == 2 * (16 * 4 + 16) + 2 * 16 + 2 + 16 + 1 == 211
    theta = np.arange(spec.num_params, dtype=float)
    p = spec.unpack(theta)
    assert list(p) == [name for name in PARAM_NAMES if name != "actor_log_std"]  # discrete: no spread
    continuous = PolyNetSpec(4, 16, 2, continuous=True, initial_log_std=-0.5)
    assert list(continuous.unpack(continuous.init(0))) == list(PARAM_NAMES)
    np.testing.assert_array_equal(continuous.std(continuous.init(0)), np.exp([-0.5, -0.5]))
    assert p["actor_W1"].shape == (16, 4) and p["actor_W1"][1, 0] == 4.0  # row-major
    assert p["actor_b1"][0] == 64 and p["actor_W2"].shape == (2, 16) and p["critic_b2"][0] == 210
    p["critic_W2"][0, 3] = -1.0
    assert theta[spec.num_params - 1 - 16 + 3] == -1.0  # views write through
    with pytest.raises(ValueError):
        spec.unpack(np.zeros(3))
    with pytest.raises(ValueError):
        PolyNetSpec(0, 4, 2)


def test_forward_is_the_polynomial_network():
    spec = PolyNetSpec(3, 4, 2)
    rng = np.random.default_rng(2)
    theta = rng.normal(size=spec.num_params)
    obs = rng.uniform(-1, 1, size=(5, 3))
    outputs, values = spec.forward(theta, obs)
    p = spec.unpack(theta)
    z = obs @ p["actor_W1"].T + p["actor_b1"]
    np.testing.assert_allclose(outputs, (z + z**2) @ p["actor_W2"].T + p["actor_b2"])
    zc = obs @ p["critic_W1"].T + p["critic_b1"]
    np.testing.assert_allclose(values, (zc + zc**2) @ p["critic_W2"][0] + p["critic_b2"][0])
    assert outputs.shape == (5, 2) and values.shape == (5,)


def test_init_keeps_pre_activations_bounded_on_the_unit_box():
    spec = PolyNetSpec(4, 32, 2)
    theta = spec.init(3)
    p = spec.unpack(theta)
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    for net in ("actor", "critic"):
        assert np.max(np.abs(corners @ p[f"{net}_W1"].T)) <= 1.0 + 1e-12
        assert not np.any(p[f"{net}_b1"]) and not np.any(p[f"{net}_b2"])
    assert np.max(np.abs(p["actor_W2"])) <= 0.01
    np.testing.assert_array_equal(theta, spec.init(3))
    assert not np.array_equal(theta, spec.init(4))


def test_gradient_bounds_hold_on_the_unit_box():
    spec = PolyNetSpec(3, 5, 3)
    rng = np.random.default_rng(4)
    theta = rng.normal(scale=0.7, size=spec.num_params)
    l_actor, l_critic = spec.gradient_bounds(theta)
    marker = np.zeros(spec.num_params)
    for name, view in spec.unpack(marker).items():
        view[...] = name.startswith("actor")
    actor = marker > 0
    for _ in range(20):
        obs = np.sign(rng.normal(size=(7, 3))) * rng.uniform(0.5, 1.0, size=(7, 3))  # near the corners
        d_actor, d_critic = rng.normal(size=(7, 3)), rng.normal(size=7)
        grad = np.abs(spec.gradient(theta, obs, d_actor, d_critic))
        assert np.all(grad[actor] <= l_actor * np.abs(d_actor).sum() + 1e-12)
        assert np.all(grad[~actor] <= l_critic * np.abs(d_critic).sum() + 1e-12)

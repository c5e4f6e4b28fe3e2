"""NumPy actor-critic: shapes, distributions, and every gradient against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scenarios.policy import Policy, PolicySpec, PPOBatch

DISCRETE = PolicySpec(obs_dim=4, action_kind="discrete", action_dim=3, hidden=(5, 4))
CONTINUOUS = PolicySpec(obs_dim=3, action_kind="continuous", action_dim=2, hidden=(6,),
                        action_low=(-2.0, -1.0), action_high=(2.0, 3.0))


def _random_theta(spec: PolicySpec, seed: int) -> np.ndarray:
    """Init plus noise so the tiny last actor layer does not hide gradient errors."""
    rng = np.random.default_rng(seed)
    return spec.init(seed) + 0.3 * rng.standard_normal(spec.num_params)


def _finite_diff(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = h
        grad.flat[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _batch(spec: PolicySpec, theta: np.ndarray, n: int, seed: int) -> PPOBatch:
    """Old log-probs chosen so ratios sit in every clipping regime but away from the kinks."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, spec.obs_dim))
    policy = Policy(spec, theta)
    actions, logp = policy.act(obs, rng)
    ratios = rng.choice([0.5, 0.9, 1.05, 1.5], size=n)
    return PPOBatch(obs=obs, actions=actions, old_log_probs=logp - np.log(ratios),
                    advantages=rng.standard_normal(n), returns=rng.standard_normal(n))


def test_num_params_matches_layout():
    # actor 4*5+5 + 5*4+4 + 4*3+3, critic 4*5+5 + 5*4+4 + 4*1+1
    assert DISCRETE.num_params == (25 + 24 + 15) + (25 + 24 + 5)
    assert CONTINUOUS.num_params == (3 * 6 + 6 + 6 * 2 + 2) + 2 + (3 * 6 + 6 + 6 + 1)
    theta = DISCRETE.init(0)
    assert theta.shape == (DISCRETE.num_params,) and theta.dtype == np.float64


def test_init_is_orthogonal_and_deterministic():
    spec = PolicySpec(obs_dim=8, action_kind="discrete", action_dim=4, hidden=(16,))
    params = spec.unflatten(spec.init(3))
    w0 = params.actor[0][0]
    np.testing.assert_allclose(w0 @ w0.T, 2.0 * np.eye(8), atol=1e-12)  # gain sqrt(2), rows orthonormal
    assert np.abs(params.actor[-1][0]).max() <= 0.01 + 1e-12
    assert all(np.all(b == 0) for _, b in params.actor + params.critic)
    np.testing.assert_array_equal(spec.init(3), spec.init(3))
    assert not np.array_equal(spec.init(3), spec.init(4))


def test_unflatten_rejects_wrong_shape():
    with pytest.raises(ValueError, match="theta must have shape"):
        DISCRETE.unflatten(np.zeros(DISCRETE.num_params + 1))


def test_discrete_distribution_consistency():
    theta = _random_theta(DISCRETE, 1)
    policy = Policy(DISCRETE, theta)
    obs = np.random.default_rng(0).standard_normal((6, 4))
    probs = policy.action_probs(obs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    actions = np.array([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(policy.log_prob(obs, actions), np.log(probs[np.arange(6), actions]))
    np.testing.assert_allclose(policy.entropy(obs), -(probs * np.log(probs)).sum(axis=1))
    greedy, _ = policy.act(obs, np.random.default_rng(0), greedy=True)
    np.testing.assert_array_equal(greedy, probs.argmax(axis=1))


def test_discrete_sampling_matches_probabilities():
    policy = Policy(DISCRETE, _random_theta(DISCRETE, 2))
    obs = np.tile(np.random.default_rng(1).standard_normal((1, 4)), (20000, 1))
    actions, _ = policy.act(obs, np.random.default_rng(5))
    freq = np.bincount(actions, minlength=3) / actions.size
    np.testing.assert_allclose(freq, policy.action_probs(obs[:1])[0], atol=0.015)


def test_gaussian_log_prob_and_entropy_in_action_units():
    theta = _random_theta(CONTINUOUS, 1)
    policy = Policy(CONTINUOUS, theta)
    obs = np.random.default_rng(0).standard_normal((5, 3))
    mean, std = policy.gaussian(obs)
    actions = mean + std * np.random.default_rng(1).standard_normal(mean.shape)
    expected = (-0.5 * ((actions - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)).sum(axis=1)
    np.testing.assert_allclose(policy.log_prob(obs, actions), expected)
    np.testing.assert_allclose(policy.entropy(obs), (np.log(std) + 0.5 * (1 + math.log(2 * math.pi))).sum())
    greedy, _ = policy.act(obs, np.random.default_rng(0), greedy=True)
    np.testing.assert_allclose(greedy, mean)
    # the mean is centred on the action box: zero network output maps to (low + high) / 2
    zero = CONTINUOUS.init(0)
    zero[:] = 0.0
    np.testing.assert_allclose(Policy(CONTINUOUS, zero).gaussian(obs)[0], np.tile([0.0, 1.0], (5, 1)))


@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_ppo_gradient_matches_finite_differences(spec: PolicySpec, ent_coef: float):
    theta = _random_theta(spec, 7)
    batch = _batch(spec, theta, n=12, seed=3)
    coefs = dict(clip_coef=0.2, ent_coef=ent_coef, vf_coef=0.7)
    info, grad = Policy(spec, theta).ppo_loss_and_grad(batch, **coefs)
    numeric = _finite_diff(lambda t: Policy(spec, t).ppo_loss_and_grad(batch, **coefs)[0].loss, theta)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert 0.0 < info.clip_fraction < 1.0  # the batch really exercises both branches


def test_ppo_loss_terms_at_unit_ratio():
    theta = _random_theta(DISCRETE, 4)
    policy = Policy(DISCRETE, theta)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((8, 4))
    actions, logp = policy.act(obs, rng)
    adv, ret = rng.standard_normal(8), rng.standard_normal(8)
    info, _ = policy.ppo_loss_and_grad(PPOBatch(obs, actions, logp, adv, ret), 0.2, 0.0, 0.5)
    assert info.policy_loss == pytest.approx(-adv.mean())
    assert info.value_loss == pytest.approx(0.5 * np.mean((policy.value(obs) - ret) ** 2))
    assert info.approx_kl == pytest.approx(0.0, abs=1e-12) and info.clip_fraction == 0.0


@pytest.mark.parametrize("loss", ["cross_entropy", "kl"])
@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
def test_grad_obs_matches_finite_differences(spec: PolicySpec, loss: str):
    policy = Policy(spec, _random_theta(spec, 11))
    rng = np.random.default_rng(2)
    obs = rng.standard_normal((4, spec.obs_dim))
    if loss == "cross_entropy":
        target, _ = policy.act(obs, rng)
    elif spec.action_kind == "discrete":
        target = rng.dirichlet(np.ones(spec.action_dim), size=4)
    else:
        target = policy.gaussian(obs)[0] + rng.standard_normal((4, spec.action_dim))
    value, grad = policy.grad_obs(obs, target, loss)
    numeric = _finite_diff(lambda o: policy.grad_obs(o, target, loss)[0], obs)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert grad.shape == obs.shape and value > 0


def test_kl_grad_obs_is_zero_at_the_reference():
    policy = Policy(DISCRETE, _random_theta(DISCRETE, 5))
    obs = np.random.default_rng(0).standard_normal((3, 4))
    value, grad = policy.grad_obs(obs, policy.action_probs(obs), "kl")
    assert value == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_wrong_kind_accessors_raise():
    with pytest.raises(TypeError):
        Policy(DISCRETE, DISCRETE.init(0)).gaussian(np.zeros((1, 4)))
    with pytest.raises(TypeError):
        Policy(CONTINUOUS, CONTINUOUS.init(0)).action_probs(np.zeros((1, 3)))


def test_spec_validation():
    with pytest.raises(ValueError, match="action_kind"):
        PolicySpec(obs_dim=2, action_kind="multi", action_dim=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden"):
        PolicySpec(obs_dim=2, action_kind="discrete", action_dim=2, hidden=(0,))

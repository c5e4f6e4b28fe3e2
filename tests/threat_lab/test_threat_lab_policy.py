"""Attacks on trained policies: evaluation-time attacks, robust training math, metrics, explanations (fast tests)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from fedhe.lab.policy_attacks import (
    ATTACKS,
    PUBLISHED_STD,
    RANDOM_POLICY_STD,
    STATE_STD,
    estimate_obs_std,
    make_attack,
    random_policy_std,
    random_std,
    reference_std,
)
from fedhe.lab.policy_metrics import categorical_deviation, gaussian_deviation, retention, run_episodes
from participant.ppo import ParticipantTrainer
from scenarios import Policy, load_scenario
from scenarios.adversarial import (
    PerturbedRewardCorrection,
    kl_regularizer_and_grad,
    pgd_max_kl,
    state_kl,
)
from scenarios.policy import PolicySpec
from scenarios.scenario import RobustConfig

CARTPOLE_STD = np.array([0.3, 0.16, 0.02, 0.2])


def trained_like(spec: PolicySpec, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """A random policy with a large last layer, so its decisions depend on the state."""
    theta = spec.init(seed)
    p = spec.unflatten(theta)
    p.actor[-1][0][...] = np.random.default_rng(seed).standard_normal(p.actor[-1][0].shape) * scale
    return theta


@pytest.fixture(scope="module")
def cart():
    sc = load_scenario("cartpole")
    spec = sc.policy_spec()
    return sc, Policy(spec, trained_like(spec))


@pytest.fixture(scope="module")
def pend():
    sc = load_scenario("pendulum")
    spec = sc.policy_spec()
    return sc, Policy(spec, trained_like(spec, 1, 1.0))


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_wrappers_pass_env_checker(cart, pend, name):
    for sc, pol in (cart, pend):
        std = np.ones(pol.spec.obs_dim) * 0.2
        env = make_attack(sc.build_env(0, 0), pol, name, 0.5, obs_std=std, seed=3)
        check_env(env.unwrapped, skip_render_check=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "different from the unwrapped version" is expected for a wrapper
            check_env(env, skip_render_check=True)


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_are_seeded_and_reproducible(cart, name):
    sc, pol = cart

    def trace(seed: int) -> list[float]:
        env = make_attack(sc.build_env(0, 0), pol, name, 0.5, obs_std=CARTPOLE_STD, seed=seed)
        out = run_episodes(env, pol, 2, 123)
        return out["returns"] + [out["pd_tv"], out["pd_flip"]]

    assert trace(1) == trace(1)
    # Different attack seeds differ for the randomised attacks (given enough steps).
    if name in ("gaussian", "action"):
        assert trace(1) != trace(2)


def test_observation_attacks_stay_in_the_ball(cart):
    sc, pol = cart
    for name in ("fgsm", "pgd", "mad", "gaussian"):
        env = make_attack(sc.build_env(0, 0), pol, name, 0.5, obs_std=CARTPOLE_STD, seed=0)
        obs, info = env.reset(seed=5)
        for _ in range(20):
            clean = info["attack"]["clean_obs"]
            assert np.all(np.abs(obs - clean) <= 0.5 * CARTPOLE_STD + 1e-6)
            obs, _, term, trunc, info = env.step(int(pol.action_probs(obs).argmax()))
            if term or trunc:
                break


def test_fgsm_and_pgd_beat_random_noise_on_flips(cart):
    sc, pol = cart
    res = {}
    for name in ("fgsm", "pgd", "gaussian"):
        env = make_attack(sc.build_env(0, 0), pol, name, 1.0, obs_std=CARTPOLE_STD, seed=0)
        res[name] = run_episodes(env, pol, 3, 0)
    assert res["fgsm"]["pd_flip"] > res["gaussian"]["pd_flip"]
    assert res["pgd"]["pd_flip"] >= res["fgsm"]["pd_flip"] - 0.05


def test_mad_increases_kl(cart, pend):
    for _, pol in (cart, pend):
        rng = np.random.default_rng(0)
        obs = rng.standard_normal((64, pol.spec.obs_dim)) * 0.3
        radius = np.full(pol.spec.obs_dim, 0.2)
        hat = pgd_max_kl(pol, obs, radius, 10, rng)
        rand = obs + rng.uniform(-1, 1, obs.shape) * radius
        assert np.all(np.abs(hat - obs) <= radius + 1e-12)
        assert state_kl(pol, obs, hat).mean() > 2 * state_kl(pol, obs, rand).mean()


def test_timed_attack_attacks_fewer_steps(cart):
    sc, pol = cart
    full = run_episodes(make_attack(sc.build_env(0, 0), pol, "fgsm", 0.5, obs_std=CARTPOLE_STD), pol, 2, 0)
    timed = run_episodes(make_attack(sc.build_env(0, 0), pol, "fgsm", 0.5, obs_std=CARTPOLE_STD,
                                     timing_threshold=0.9), pol, 2, 0)
    assert full["attacked_frac"] == 1.0
    assert timed["attacked_frac"] < 1.0


def test_action_attack_rate(cart):
    sc, pol = cart
    res = run_episodes(make_attack(sc.build_env(0, 0), pol, "action", 0.0, alpha=0.3, seed=0), pol, 5, 0)
    assert 0.1 < res["pd_flip"] < 0.5 and res["pd_kl"] is None
    assert res["asr"] == pytest.approx(1.0)  # the least likely action differs from the greedy one


@pytest.mark.parametrize("through_clean", [False, True])
@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_kl_regularizer_gradient_matches_finite_differences(kind, through_clean):
    if kind == "discrete":
        spec = PolicySpec(4, "discrete", 3, (8,))
    else:
        spec = PolicySpec(3, "continuous", 2, (8,), (-2.0, -1.0), (2.0, 1.0))
    rng = np.random.default_rng(0)
    theta = spec.init(0) + 0.3 * rng.standard_normal(spec.num_params)
    obs = rng.standard_normal((6, spec.obs_dim))
    hat = obs + 0.3 * rng.standard_normal(obs.shape)
    value, grad = kl_regularizer_and_grad(Policy(spec, theta), obs, hat, through_clean=through_clean)
    assert value == pytest.approx(state_kl(Policy(spec, theta), obs, hat).mean())
    clean_target = Policy(spec, theta.copy())
    n_actor = sum(a * b + b for a, b in zip(spec.actor_sizes[:-1], spec.actor_sizes[1:]))

    def f(t: np.ndarray) -> float:
        pol = Policy(spec, t)
        if through_clean:
            return float(state_kl(pol, obs, hat).mean())
        # clean distribution is a stop-gradient target: KL(p_fixed || q_theta)
        if spec.action_kind == "discrete":
            p = clean_target.action_probs(obs)
            q = pol.action_probs(hat)
            return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())
        mu = clean_target.logits(obs)
        std = np.exp(clean_target.params.log_std)
        return float((0.5 * ((mu - pol.logits(hat)) / std) ** 2).sum(axis=1).mean())

    h = 1e-6
    for i in rng.choice(n_actor, 25, replace=False):
        e = np.zeros_like(theta)
        e[i] = h
        fd = (f(theta + e) - f(theta - e)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=1e-4, abs=1e-8)
    assert np.all(grad[n_actor:] == 0)  # critic and (stop-gradient) log-std untouched


def test_metric_formulas():
    tv, kl, flip = categorical_deviation(np.array([0.9, 0.1]), np.array([0.4, 0.6]))
    assert tv == pytest.approx(0.5) and flip == 1.0
    assert kl == pytest.approx(0.9 * np.log(0.9 / 0.4) + 0.1 * np.log(0.1 / 0.6))
    tv, kl, flip = gaussian_deviation(np.array([0.0]), np.array([1.0]), np.array([1.0]), np.array([2.0]))
    assert kl == pytest.approx(0.5) and tv == pytest.approx(0.3829, abs=1e-4) and flip == 1.0
    assert retention(250.0, 500.0, 20.0) == 0.5
    assert retention(-300.0, -100.0, -500.0) == pytest.approx(0.5)  # min-max for negative rewards


def test_reward_correction_is_unbiased_for_flipped_rewards():
    rng = np.random.default_rng(0)
    n, e = 20000, 0.2
    obs = rng.standard_normal((n, 4))
    actions = rng.integers(0, 2, n)
    observed = np.where(rng.random(n) < e, -1.0, 1.0)
    corr = PerturbedRewardCorrection()
    corr.update(observed, obs, actions)
    surrogate = corr.surrogate(observed)
    assert surrogate.mean() == pytest.approx(1.0, abs=0.03)
    low, high = np.unique(surrogate)
    assert low == pytest.approx(-1.0) and high == pytest.approx((1 + e) / (1 - e), abs=0.03)


@pytest.mark.parametrize("robust", [
    RobustConfig(mode="sa-ppo", kappa=0.5, epsilon=0.3, attack_steps=2),
    RobustConfig(mode="noise-injection", epsilon=0.3),
    RobustConfig(mode="reward-defense", reward_flip_rate=0.2),
])
def test_robust_training_modes_run_locally(robust):
    sc = load_scenario("cartpole")
    sc = sc.with_overrides(ppo=dataclasses.replace(sc.ppo, num_envs=2, steps_per_env=64, epochs=2, robust=robust))
    trainer = ParticipantTrainer(sc, 0, 0)
    theta = sc.policy_spec().init(0)
    result = trainer.train(theta, 1)
    assert result.update.shape == theta.shape and np.all(np.isfinite(result.update))
    if robust.mode == "sa-ppo":
        assert result.stats["sa_kl"] >= 0
    again = ParticipantTrainer(sc, 0, 0).train(theta, 1)
    np.testing.assert_array_equal(result.update, again.update)  # deterministic per (seed, participant)


def test_estimate_obs_std(cart):
    sc, pol = cart
    std = estimate_obs_std(sc.build_env(0, 0), pol, episodes=2)
    assert std.shape == (4,) and np.all(std > 0)


def test_random_policy_std_table_is_reproducible_from_the_environment():
    sc = load_scenario("cartpole")
    env = sc.build_env(0, 123)
    est = random_policy_std(env)
    env.close()
    np.testing.assert_allclose(est, RANDOM_POLICY_STD["cartpole"], atol=6e-4)
    np.testing.assert_array_equal(random_std(sc), RANDOM_POLICY_STD["cartpole"])


def test_reference_std_prefers_the_published_table():
    """Default budget unit: SA-DQN's published stds where they exist, the random-policy estimate elsewhere."""
    np.testing.assert_array_equal(reference_std(load_scenario("cartpole")), PUBLISHED_STD["cartpole"])
    np.testing.assert_array_equal(reference_std(load_scenario("pendulum")), RANDOM_POLICY_STD["pendulum"])
    for name in ("cartpole", "acrobot", "pendulum", "lunarlander"):
        spec = load_scenario(name).policy_spec()
        assert len(STATE_STD[name]) == spec.obs_dim and min(STATE_STD[name]) > 0


def test_reference_std_is_estimated_for_unlisted_scenarios():
    sc = load_scenario("cartpole").with_overrides(name="cartpole-unlisted")
    std = reference_std(sc)
    np.testing.assert_allclose(std, RANDOM_POLICY_STD["cartpole"], atol=1e-3)  # same env, same procedure
    std[0] = 99.0
    assert reference_std(sc)[0] != 99.0  # cached copy is not aliased


def test_sa_ppo_ball_uses_fixed_sigma_when_given():
    sc = load_scenario("cartpole")
    sigma = STATE_STD["cartpole"]
    robust = RobustConfig(mode="sa-ppo", kappa=0.5, epsilon=0.5, attack_steps=2, obs_std=sigma)
    sc = sc.with_overrides(ppo=dataclasses.replace(sc.ppo, num_envs=2, steps_per_env=64, epochs=1, robust=robust))
    trainer = ParticipantTrainer(sc, 0, 0)
    trainer.train(sc.policy_spec().init(0), 1)
    np.testing.assert_allclose(trainer._radius, 0.5 * np.asarray(sigma))
    batch = RobustConfig(mode="sa-ppo", kappa=0.5, epsilon=0.5, attack_steps=2)
    sc2 = sc.with_overrides(ppo=dataclasses.replace(sc.ppo, robust=batch))
    trainer2 = ParticipantTrainer(sc2, 0, 0)
    trainer2.train(sc2.policy_spec().init(0), 1)
    assert not np.allclose(trainer2._radius, 0.5 * np.asarray(sigma))  # legacy: the batch's own std
    with pytest.raises(ValueError):
        RobustConfig(obs_std=(0.1, 0.0))


def test_robust_config_validation():
    with pytest.raises(ValueError):
        RobustConfig(mode="bogus")
    with pytest.raises(ValueError):
        RobustConfig(reward_flip_rate=0.6)
    with pytest.raises(ValueError):
        RobustConfig(kappa=-1.0)


@pytest.mark.parametrize("which", ["cart", "pend"])
def test_integrated_gradients_completeness(which, cart, pend):
    from fedhe.lab.attributions import decision_value_and_grad, integrated_gradients

    sc, pol = cart if which == "cart" else pend
    obs = np.random.default_rng(1).standard_normal((5, pol.spec.obs_dim)) * 0.5
    action = pol.action_probs(obs).argmax(axis=1) if pol.discrete else None
    ig = integrated_gradients(pol, obs, action, steps=200)
    f_s = decision_value_and_grad(pol, obs, action)[0]
    f_b = decision_value_and_grad(pol, np.zeros_like(obs), action)[0]
    np.testing.assert_allclose(ig.sum(axis=1), f_s - f_b, atol=1e-3)


def test_explain_attack_and_plot(cart, tmp_path):
    from fedhe.lab.attributions import OBS_NAMES, explain_attack, plot_attributions

    sc, pol = cart
    env = make_attack(sc.build_env(0, 0), pol, "fgsm", 0.5, obs_std=CARTPOLE_STD)
    summary = explain_attack(env, pol, 1, 0, CARTPOLE_STD)
    assert summary["steps"] > 0 and len(summary["mean_abs_ig_clean"]) == 4
    assert max(summary["mean_perturbation_std"]) == pytest.approx(0.5, abs=1e-3)
    png = plot_attributions(summary, tmp_path / "ig.png", OBS_NAMES["cartpole"], "test")
    assert png.stat().st_size > 1000

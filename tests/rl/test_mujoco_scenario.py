"""The MuJoCo built-in (HalfCheetah): it resolves, its environments standardize observations by fixed
statistics, local PPO runs on it, and its published reference curve loads."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

from benchmarks.reference import reference_for, reference_summary
from participant.ppo import ParticipantTrainer
from protos.plan import resolve_plan
from protos.settings import RunSettings
from scenarios import load_scenario
from scenarios.builtin import HALFCHEETAH_OBS_MEAN, HALFCHEETAH_OBS_STD, make_normalized


def test_halfcheetah_resolves_with_its_round_budget():
    plan = resolve_plan(RunSettings(scenario="halfcheetah"))
    scenario, settings = plan.scenario, plan.settings
    assert scenario.name == "halfcheetah" and settings.num_server_rounds == scenario.rounds == 160
    spec = scenario.policy_spec()
    assert (spec.obs_dim, spec.action_kind, spec.action_dim, spec.hidden) == (17, "continuous", 6, (64, 64))
    assert spec.num_params > 8192  # two ciphertext chunks per vector


def test_halfcheetah_observations_are_standardized_by_fixed_statistics_and_rewards_stay_raw():
    """The same seed and actions on the bare environment: observations differ only by the fixed affine map."""
    wrapped, bare = load_scenario("halfcheetah").build_env(0, 0), gym.make("HalfCheetah-v5")
    mean, std = np.array(HALFCHEETAH_OBS_MEAN), np.array(HALFCHEETAH_OBS_STD)
    try:
        obs, _ = wrapped.reset(seed=4)
        raw, _ = bare.reset(seed=4)
        np.testing.assert_allclose(obs, np.clip((raw - mean) / std, -10, 10))
        rng = np.random.default_rng(0)
        for _ in range(50):
            action = rng.uniform(-1, 1, 6)
            obs, reward, *_ = wrapped.step(action)
            raw, raw_reward, *_ = bare.step(action)
            np.testing.assert_allclose(obs, np.clip((raw - mean) / std, -10, 10))
            assert reward == raw_reward
    finally:
        wrapped.close()
        bare.close()
    assert wrapped.observation_space.contains(obs)
    with pytest.raises(ValueError, match="obs_mean and obs_std"):
        make_normalized(0, 0, "HalfCheetah-v5", obs_mean=(0.0,), obs_std=(1.0,))


def test_one_short_local_ppo_update_on_halfcheetah():
    base = load_scenario("halfcheetah")
    ppo = dataclasses.replace(base.ppo, num_envs=2, steps_per_env=64, epochs=1, minibatches=2)
    scenario = base.with_overrides(ppo=ppo)
    trainer = ParticipantTrainer(scenario, participant_index=1, seed=3)
    try:
        theta = scenario.policy_spec().init(3)
        result = trainer.train(theta, round=1)
    finally:
        trainer.close()
    assert result.update.shape == theta.shape and np.all(np.isfinite(result.update))
    assert 0 < np.linalg.norm(result.update) and result.steps == 128
    assert set(result.stats) >= {"policy_loss", "value_loss", "approx_kl"}


def test_halfcheetah_reference_curve_is_data_with_a_source():
    curve = reference_for("halfcheetah")
    assert curve is not None and "cleanrl" in curve.url
    assert curve.at(curve.steps[0]) == curve.returns[0] and curve.at(curve.steps[-1] + 1) is None
    summary = reference_summary("halfcheetah", 150_000)
    assert summary is not None and summary["return"] == curve.at(150_000)
    assert reference_for("cartpole") is None and reference_summary("cartpole", 1) is None

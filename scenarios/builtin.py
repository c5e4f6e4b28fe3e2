"""Built-in scenarios. The shared tuned values (8 envs x 256 steps, 10 epochs, local lr 2.5e-3,
C=2, server lr 0.2, beta1 0.5, beta2 0.99) are the Scenario/PPOConfig defaults; each built-in
states only what differs (tuned with benchmarks/plain_federated_rl.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from scenarios.scenario import PPOConfig, RolloutConfig, Scenario


def make_cartpole(participant_index: int, seed: int, length: float = 0.5) -> gym.Env:
    """CartPole-v1 with a configurable pole half-length (CartPoleEnv has no such kwarg)."""
    del participant_index, seed  # the pole length comes from env_kwargs; episodes are seeded at reset
    env = gym.make("CartPole-v1")
    physics = env.unwrapped
    physics.length = float(length)
    physics.polemass_length = physics.masspole * physics.length
    return env


def make_normalized(participant_index: int, seed: int, env_id: str, obs_clip: float = 10.0, **kwargs) -> gym.Env:
    """``env_id`` with CleanRL's observation pipeline for MuJoCo: running mean/std normalization, then clipping.

    The statistics live in this environment object, so they stay with the participant and are not part of
    theta (a fresh environment, e.g. for evaluation, starts them again). Rewards are scaled by
    ``ppo.reward_scale`` instead of a reward wrapper: the vector env records returns after these wrappers,
    and released returns must stay raw.
    """
    del participant_index, seed  # episodes are seeded at reset
    env = gym.wrappers.NormalizeObservation(gym.make(env_id, **kwargs))
    bounds = gym.spaces.Box(-obs_clip, obs_clip, env.observation_space.shape, env.observation_space.dtype)
    return gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -obs_clip, obs_clip), bounds)


CARTPOLE = Scenario(
    name="cartpole",
    description="CartPole-v1, organisations with pole half-lengths 0.5/0.6/0.45",
    make_env=make_cartpole,
    env_kwargs=({"length": 0.5}, {"length": 0.6}, {"length": 0.45}),
    env_variants={"long-pole": {"length": 0.75}, "short-pole": {"length": 0.35}},
    reward_threshold=475.0,
    hidden=(64,),
    rounds=60,
    rollout=RolloutConfig(obs_scale=(2.4, 3.0, 0.21, 3.0)),
)

ACROBOT = Scenario(
    name="acrobot",
    description="Acrobot-v1 (swing up), solved at -100",
    env_id="Acrobot-v1",
    hidden=(64,),
    rounds=100,
)

LUNARLANDER = Scenario(
    name="lunarlander",
    description="LunarLander-v3 (discrete), solved at 200",
    env_id="LunarLander-v3",
    hidden=(64, 64),
    rounds=300,
    ppo=PPOConfig(gamma=0.999, gae_lambda=0.98, ent_coef=0.01, reward_scale=0.1),
)

PENDULUM = Scenario(
    name="pendulum",
    description="Pendulum-v1 (continuous torque), no official threshold",
    env_id="Pendulum-v1",
    hidden=(64, 64),
    rounds=60,
    ppo=PPOConfig(gamma=0.9, reward_scale=0.1),
)

HALFCHEETAH = Scenario(
    name="halfcheetah",
    description="HalfCheetah-v5 (MuJoCo), 64x64 Gaussian policy, normalized observations",
    make_env=make_normalized,
    env_kwargs={"env_id": "HalfCheetah-v5"},
    reward_threshold=gym.spec("HalfCheetah-v5").reward_threshold,
    hidden=(64, 64),
    rounds=160,
    ppo=PPOConfig(num_envs=4, steps_per_env=512, minibatches=32, lr=3e-4, reward_scale=0.1),
)

BUILTIN_SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (CARTPOLE, ACROBOT, LUNARLANDER, PENDULUM, HALFCHEETAH)
}

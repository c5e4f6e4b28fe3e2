"""Built-in scenarios. The shared tuned values (8 envs x 256 steps, 10 epochs, local lr 2.5e-3,
C=2, server lr 0.2, beta1 0.5, beta2 0.99) are the Scenario/PPOConfig defaults; each built-in
states only what differs (tuned with benchmarks/plain_federated_rl.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from scenarios.scenario import PPOConfig, RolloutConfig, Scenario, ServerOptimizer


def make_cartpole(participant_index: int, seed: int, length: float = 0.5) -> gym.Env:
    """CartPole-v1 with a configurable pole half-length (CartPoleEnv has no such kwarg)."""
    del participant_index, seed  # the pole length comes from env_kwargs; episodes are seeded at reset
    env = gym.make("CartPole-v1")
    physics = env.unwrapped
    physics.length = float(length)
    physics.polemass_length = physics.masspole * physics.length
    return env


def make_normalized(
    participant_index: int,
    seed: int,
    env_id: str,
    obs_mean: tuple[float, ...],
    obs_std: tuple[float, ...],
    obs_clip: float = 10.0,
    sticky_actions: float = 0.0,
    **kwargs,
) -> gym.Env:
    """``env_id`` with observations standardized by fixed statistics and clipped to +-``obs_clip``;
    ``sticky_actions`` > 0 wraps it in Gymnasium's ``StickyAction`` (the previous action is repeated with that
    probability: temporally correlated exploration; the reward is the environment's own).

    Fixed, not running statistics (CleanRL's NormalizeObservation): running ones would be participant-local
    state outside theta, so the decrypted policy would see other inputs in a fresh environment (evaluation, a
    deployed SuperNode restarting every round). Rewards are scaled by ``ppo.reward_scale``, not by a wrapper:
    the vector env records returns after these wrappers, and released returns must stay raw.
    """
    del participant_index, seed  # episodes are seeded at reset
    env = gym.make(env_id, **kwargs)
    if sticky_actions > 0:
        env = gym.wrappers.StickyAction(env, repeat_action_probability=sticky_actions)
    shape = env.observation_space.shape
    mean, std = np.asarray(obs_mean, dtype=np.float64), np.asarray(obs_std, dtype=np.float64)
    if mean.shape != shape or std.shape != shape or not np.all(std > 0):
        raise ValueError(f"{env_id}: obs_mean and obs_std need {shape} entries (std > 0)")
    space = gym.spaces.Box(-obs_clip, obs_clip, shape, np.float64)
    return gym.wrappers.TransformObservation(env, lambda obs: np.clip((obs - mean) / std, -obs_clip, obs_clip), space)


# Per-dimension mean and std of HalfCheetah's observations: the running statistics (CleanRL-style) of one
# participant's environment over a 160-round plaintext federation (seed 0, 82k observations), rounded
# (docs/continuous-control.md).
HALFCHEETAH_OBS_MEAN = (-0.07, 0.46, 0.05, 0.04, 0.03, 0.34, 0.28, -0.01, 2.25, -0.03, -0.08, 0.34, -0.33, 0.06, 0.07,
                        0.18, 0.06)
HALFCHEETAH_OBS_STD = (0.19, 1.1, 0.44, 0.35, 0.37, 0.36, 0.3, 0.28, 1.8, 1.0, 1.8, 12.0, 9.4, 10.0, 8.1, 7.5, 7.9)


CARTPOLE = Scenario(
    name="cartpole",
    description="CartPole-v1, organisations with pole half-lengths 0.5/0.6/0.45",
    make_env=make_cartpole,
    env_kwargs=({"length": 0.5}, {"length": 0.6}, {"length": 0.45}),
    env_variants={"long-pole": {"length": 0.75}, "short-pole": {"length": 0.35}},
    reward_threshold=475.0,
    hidden=(64,),
    rounds=60,
    # sgd_lr: HE-SGD's step (--server-optimizer sgd), from 1-seed plaintext runs: lr 1 reached the threshold at
    # round 56, 10 at 105, 0.3 not within 117 rounds, 3 diverged.
    rollout=RolloutConfig(obs_scale=(2.4, 3.0, 0.21, 3.0),
                          server=ServerOptimizer(lr=0.05, beta1=0.9, beta2=0.99, clip_bound=2.0, sgd_lr=1.0)),
)

ACROBOT = Scenario(
    name="acrobot",
    description="Acrobot-v1 (swing up), solved at -100",
    env_id="Acrobot-v1",
    hidden=(64,),
    rounds=100,
    # Encrypted rollouts: the joint velocities (bounds 4 pi and 9 pi) scaled by 4 and 8 rad/s, so the
    # swing-pumping signal is not squeezed near 0, and a 3x server step. With the space's bounds and lr 0.05
    # a plaintext run stayed at -500 for 250 rounds; with these it reached -133 by round 120.
    rollout=RolloutConfig(obs_scale=(1.0, 1.0, 1.0, 1.0, 4.0, 8.0),
                          server=ServerOptimizer(lr=0.15, beta1=0.9, beta2=0.99, clip_bound=2.0)),
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
    description="HalfCheetah-v5 (MuJoCo), 64x64 Gaussian policy, 160 rounds (~1M steps)",
    make_env=make_normalized,
    env_kwargs={"env_id": "HalfCheetah-v5", "obs_mean": HALFCHEETAH_OBS_MEAN, "obs_std": HALFCHEETAH_OBS_STD},
    reward_threshold=gym.spec("HalfCheetah-v5").reward_threshold,
    hidden=(64, 64),
    rounds=160,
    ppo=PPOConfig(num_envs=4, steps_per_env=512, minibatches=32, lr=3e-4, reward_scale=0.1),
    server=ServerOptimizer(lr=0.35, beta1=0.5, beta2=0.99, clip_bound=2.0),
)

# MountainCar-v0's observation box, position [-1.2, 0.6] and velocity [-0.07, 0.07], as centre and half-range:
# standardized by these, observations fill [-1, 1] exactly, so both modes see the same inputs (rollout.obs_scale 1).
MOUNTAINCAR_OBS_MEAN = (-0.3, 0.0)
MOUNTAINCAR_OBS_STD = (0.9, 0.07)

# The sparse-reward built-in: the environment's own reward, -1 per step until x >= 0.5 (no shaping). Uniform random
# actions never reach the goal (0 of 100 episodes, within 200 steps or 1000), and with MountainCar-v0's 200-step
# limit local PPO stayed at -200 for 150 rounds. Two exploration aids keep the reward:
# * a 1000-step limit: an episode that reaches the goal within 200 steps returns the same, any other less than
#   -200, so returns are never higher than MountainCar-v0's and -110 is no easier. With it alone local PPO reached
#   -110 with 1 of 3 seeds in 200 rounds (the others -129 and -719); encrypted rollouts stayed at -1000 for 100;
# * Gymnasium's StickyAction, p 0.5 (the previous action is repeated with that probability): correlated actions
#   build momentum, random ones then reach the goal in 15% of 1000-step episodes. It changes the dynamics (in
#   evaluation too): a velocity-following controller loses 1.3 steps per episode (-121.3 against -120.0). p 0.25
#   explored too rarely: encrypted rollouts left -1000 only near round 370.
# Local PPO: gamma 0.999 and lambda 0.98 (the goal is 100+ steps away), reward_scale 0.1 (values near -100). In
# plaintext, 300 rounds: -110 reached at rounds 149 and 200 by 2 of 3 seeds (the third peaked at -110.25) with
# benchmarks/plain_federated_rl.py, at round 103 with `fedhe simulate --plaintext --seed 0`. Encrypted rollouts:
# server lr 0.2, -119 after 500 plaintext rounds (lr 0.05: -150; HE-SGD, sgd_lr 1: -164); -110 not reached
# (docs/encrypted-rollouts.md, Tasks).

MOUNTAINCAR = Scenario(
    name="mountaincar",
    description="MountainCar-v0, sparse reward (-1 per step until the goal), sticky actions 0.5, solved at -110",
    make_env=make_normalized,
    env_kwargs={"env_id": "MountainCar-v0", "obs_mean": MOUNTAINCAR_OBS_MEAN, "obs_std": MOUNTAINCAR_OBS_STD,
                "obs_clip": 1.0, "max_episode_steps": 1000, "sticky_actions": 0.5},
    reward_threshold=gym.spec("MountainCar-v0").reward_threshold,
    hidden=(64,),
    rounds=300,
    ppo=PPOConfig(gamma=0.999, gae_lambda=0.98, reward_scale=0.1),
    rollout=RolloutConfig(obs_scale=(1.0, 1.0), server=ServerOptimizer(lr=0.2, beta1=0.9, beta2=0.99, clip_bound=2.0),
                          rounds=500),
)

BUILTIN_SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (CARTPOLE, ACROBOT, LUNARLANDER, PENDULUM, HALFCHEETAH, MOUNTAINCAR)
}

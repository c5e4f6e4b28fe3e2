"""Experience collection, advantage estimation and the one evaluation episode loop (no learning here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from scenarios.policy import Policy


@dataclass(frozen=True)
class Rollout:
    """``steps x num_envs`` transitions; ``rewards`` are scaled and already bootstrapped on truncation."""

    obs: np.ndarray
    actions: np.ndarray
    log_probs: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    values: np.ndarray
    last_value: np.ndarray
    episode_returns: list[float]
    raw_rewards: np.ndarray | None = None  # unscaled rewards as the learner saw them (after ``reward_fn``)
    bootstrap: np.ndarray | None = None  # the scaled truncation bootstrap added into ``rewards``


class EnvironmentFailure(RuntimeError):
    """Environment code (building, reset, step) failed. The cause is chained; its text may hold an
    observation or a local path, so a participant reports only that its environment failed."""


class NonFiniteEnvironmentError(EnvironmentFailure, ValueError):
    """An environment returned NaN or infinity: nothing learned from it may leave the participant."""


def check_finite(rewards: np.ndarray, obs: np.ndarray, step: int) -> None:
    """Checked where it happens, before any learning, so the failure names its cause."""
    for name, values in (("reward", rewards), ("observation", obs)):
        if not np.all(np.isfinite(values)):
            raise NonFiniteEnvironmentError(f"the environment returned a non-finite {name} (step {step})")


class RolloutCollector:
    """Steps a same-step-autoreset vector env; episodes continue across ``collect`` calls."""

    def __init__(self, env: gym.vector.VectorEnv, seed: int) -> None:
        if env.metadata.get("autoreset_mode") != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError("RolloutCollector needs a vector env with AutoresetMode.SAME_STEP")
        self.env = env
        try:
            self.obs, _ = env.reset(seed=seed)
        except Exception as exc:
            raise EnvironmentFailure("the environment failed to reset") from exc
        space = env.single_action_space
        self._bounds = (space.low, space.high) if isinstance(space, gym.spaces.Box) else None

    def collect(
        self,
        policy: Policy,
        steps: int,
        rng: np.random.Generator,
        gamma: float,
        reward_scale: float,
        obs_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        reward_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Rollout:
        """``obs_fn`` maps what the policy sees and learns from (noise injection); ``reward_fn``
        maps the raw rewards it learns from (simulated tampering). Reported returns stay raw."""
        n = self.env.num_envs
        obs_buf = np.zeros((steps, n, self.obs.shape[1]))
        act_buf: list[np.ndarray] = []
        logp_buf = np.zeros((steps, n))
        rew_buf = np.zeros((steps, n))
        done_buf = np.zeros((steps, n), dtype=bool)
        val_buf = np.zeros((steps, n))
        raw_buf = np.zeros((steps, n))
        boot_buf = np.zeros((steps, n))
        episode_returns: list[float] = []
        for t in range(steps):
            obs = np.asarray(self.obs, dtype=np.float64)
            if obs_fn is not None:
                obs = obs_fn(obs)
            obs_buf[t] = obs
            val_buf[t] = policy.value(obs)
            actions, logp_buf[t] = policy.act(obs, rng)
            act_buf.append(actions)
            env_actions = actions if self._bounds is None else np.clip(actions, *self._bounds)
            try:
                self.obs, rewards, terminated, truncated, info = self.env.step(env_actions)
            except Exception as exc:
                raise EnvironmentFailure(f"the environment failed at step {t + 1}") from exc
            raw = np.asarray(rewards, dtype=np.float64)
            check_finite(raw, np.asarray(self.obs, dtype=np.float64), t + 1)
            if reward_fn is not None:
                raw = reward_fn(raw)
            raw_buf[t] = raw
            rew_buf[t] = reward_scale * raw
            done_buf[t] = terminated | truncated
            cut = truncated & ~terminated
            if cut.any():
                # A time-limit cut is not a real end: bootstrap with V(final observation).
                final = np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)]).astype(np.float64)
                boot_buf[t, cut] = gamma * policy.value(final)
                rew_buf[t, cut] += boot_buf[t, cut]
            if "_episode" in info:
                episode_returns.extend(float(r) for r in info["episode"]["r"][info["_episode"]])
        return Rollout(
            obs=obs_buf,
            actions=np.stack(act_buf),
            log_probs=logp_buf,
            rewards=rew_buf,
            dones=done_buf,
            values=val_buf,
            last_value=policy.value(np.asarray(self.obs, dtype=np.float64)),
            episode_returns=episode_returns,
            raw_rewards=raw_buf,
            bootstrap=boot_buf,
        )


def compute_gae(
    rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_value: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets, arrays shaped (steps, envs).

    ``dones[t]`` marks that the episode ended after step t, so V(s_{t+1}) is not used.
    """
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float64)
    last_gae = np.zeros_like(last_value, dtype=np.float64)
    for t in range(steps - 1, -1, -1):
        next_value = last_value if t == steps - 1 else values[t + 1]
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * live - values[t]
        last_gae = delta + gamma * lam * live * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


@dataclass(frozen=True)
class Step:
    """One transition of ``play_episodes``: what a per-step callback may inspect."""

    obs: np.ndarray  # the observation the action was chosen on
    info: dict  # the info that came with ``obs`` (from reset or the previous step)
    action: Any  # what was passed to ``env.step``
    reward: float
    next_info: dict  # the info ``env.step`` returned (e.g. an action attack's executed action)


ActionFn = Callable[[np.ndarray], Any]


def env_action(space: gym.Space, action: np.ndarray) -> Any:
    """One row of ``Policy.act`` as the env takes it, cast as ``RolloutCollector`` does in training so
    evaluation steps the dynamics the policy learned on: clipped to a Box and left float64 (not cast
    to the space's float32), a Python int for a Discrete space."""
    if isinstance(space, gym.spaces.Box):
        return np.clip(action, space.low, space.high)
    return int(action)


def choose_actions(space: gym.Space, policy: Policy | None, seed: int, greedy: bool = True) -> ActionFn:
    """Observation -> env action. ``policy=None``: uniform samples from ``space``, seeded here once
    with ``seed`` so a run is reproducible; else ``policy`` with ``default_rng(seed)`` (drawn only
    when not ``greedy``)."""
    if policy is None:
        space.seed(seed)
        return lambda obs: space.sample()
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> Any:
        action, _ = policy.act(np.asarray(obs, dtype=np.float64)[None], rng, greedy=greedy)
        return env_action(space, action[0])

    return act


def play_episodes(
    env: gym.Env,
    act: ActionFn,
    episodes: int,
    seed: int,
    on_step: Callable[[Step], None] | None = None,
    max_steps: int | None = None,
) -> list[float]:
    """The one evaluation episode loop: undiscounted returns of ``episodes`` episodes with reset seeds
    seed, seed+1, ..., each cut after ``max_steps`` steps if given; ``on_step`` sees every transition."""
    returns = []
    for k in range(episodes):
        obs, info = env.reset(seed=seed + k)
        total, done, t = 0.0, False, 0
        while not done and (max_steps is None or t < max_steps):
            action = act(obs)
            next_obs, reward, terminated, truncated, next_info = env.step(action)
            if on_step is not None:
                on_step(Step(obs, info, action, float(reward), next_info))
            obs, info = next_obs, next_info
            total += float(reward)
            done, t = terminated or truncated, t + 1
        returns.append(total)
    return returns


def evaluate_policy(
    env: gym.Env, policy: Policy, episodes: int, seed: int, greedy: bool = True
) -> list[float]:
    """Undiscounted returns of ``episodes`` full episodes (reset seeds seed, seed+1, ...)."""
    return play_episodes(env, choose_actions(env.action_space, policy, seed, greedy), episodes, seed)

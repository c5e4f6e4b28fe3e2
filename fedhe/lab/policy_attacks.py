"""Evaluation-time attacks on a trained policy, as Gymnasium wrappers.

The victim is a fixed ``Policy`` (white-box: the attacker knows theta). Observation attacks return
the perturbed observation to the agent; action attacks replace the agent's action before it reaches
the environment. Every step's ``info["attack"]`` carries what the metrics need (clean observation,
whether this step was attacked, the intended and executed action).

Budgets:
* observation attacks: l-inf radius ``epsilon`` in units of each observation dimension's standard
  deviation ``obs_std`` (per-dimension; default ``STATE_STD``/``reference_std``: a fixed table per
  scenario; alternatives ``random_std`` and ``estimate_obs_std``: the policy's own clean states), so the ball is
  |s_hat_d - s_d| <= epsilon * obs_std_d; perturbed observations are clipped to the observation space.
* ``action``: probability ``alpha`` per step of taking the adversarial action.
* ``timing_threshold``: strategically timed variant (Lin et al. 2017): attack only steps where the
  policy's preference gap max_a pi(a|s) - min_a pi(a|s) is at least the threshold (discrete only).

Attacks (``make_attack``):
* ``fgsm``  one signed step (Huang et al. 2017): maximise -log pi(a*|s_hat), a* = argmax pi(.|s).
  Gaussian policies: the loss has zero gradient at s, so FGSM takes its signed step on the KL from a
  uniform random start inside a 0.1 * epsilon ball (seeded).
* ``pgd``   ``steps`` signed steps of size 2.5 * epsilon / steps on the same loss, random start.
* ``mad``   PGD maximising KL(pi(.|s) || pi(.|s_hat)) (Zhang et al. 2020, "maximal action difference").
* ``gaussian``  random baseline in the same ball: s + clip(N(0, (epsilon*std)^2), -epsilon*std, +epsilon*std).
* ``action``  PR-MDP (Tessler et al. 2019): with probability ``alpha`` the executed action is the
  adversary's: the least likely action under pi(.|s) (discrete), or the mean action reflected
  through the centre of the action range, a_adv = 2 * centre - mu(s) (continuous).

Seeding: ``reset(seed=k)`` reseeds the attack's own RNG from (attack seed, k), so an episode
with a given reset seed is reproducible regardless of what ran before.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from scenarios.adversarial import pgd_max_kl, project
from scenarios.policy import Policy
from scenarios.rollout import choose_actions, play_episodes

OBS_ATTACKS = ("fgsm", "pgd", "mad", "gaussian")
ATTACKS = (*OBS_ATTACKS, "action")

# The default sigma of the budget (``reference_std``): a fixed, policy-independent per-dimension state
# std per scenario, so every train mode and seed faces the same absolute ball, and SA-PPO /
# noise-injection training measure their epsilon in the same units (``RobustConfig.obs_std``).
# CartPole and Acrobot: the stds SA-DQN publishes for exactly this purpose (Zhang et al. 2020,
# huanzhang12/SA_DQN attacks.py: CARTPOLE_STD, ACROBOT_STD).
PUBLISHED_STD: dict[str, tuple[float, ...]] = {
    "cartpole": (0.7322321, 1.0629482, 0.12236707, 0.43851405),
    "acrobot": (0.36641926, 0.65119815, 0.6835106, 0.67652863, 2.0165246, 3.0202584),
}
# Every other scenario: the states a uniform random policy visits (``random_policy_std`` with its
# defaults: participant 0's environment, reset seeds 0, 1, 2, ... and action-space seed 0, episodes
# until >= 20,000 states), rounded to 3 decimals; unlisted scenarios are estimated on first use
# and cached per process. Not the default for CartPole: its random-policy std inflates the angular
# velocity relative to the angle (0.768 vs 0.092), and random noise on the velocity alone then
# destabilises a solved policy more than FGSM does (docs/threat-lab.md).
RANDOM_POLICY_STD: dict[str, tuple[float, ...]] = {
    "cartpole": (0.081, 0.511, 0.092, 0.768),
    "acrobot": (0.199, 0.456, 0.459, 0.616, 1.302, 2.144),
    "pendulum": (0.65, 0.685, 3.622),
    "lunarlander": (0.319, 0.461, 0.649, 0.488, 0.497, 0.399, 0.108, 0.124),
}
STATE_STD: dict[str, tuple[float, ...]] = {**RANDOM_POLICY_STD, **PUBLISHED_STD}
_STD_CACHE: dict[str, np.ndarray] = {}


class ObservationAttack(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Perturb the observations the agent sees (``fgsm``, ``pgd``, ``mad``, ``gaussian``)."""

    def __init__(
        self,
        env: gym.Env,
        policy: Policy,
        kind: str,
        epsilon: float,
        obs_std: np.ndarray,
        steps: int = 10,
        timing_threshold: float | None = None,
        seed: int = 0,
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, policy=policy, kind=kind, epsilon=epsilon, obs_std=obs_std,
                                                 steps=steps, timing_threshold=timing_threshold, seed=seed)
        gym.Wrapper.__init__(self, env)
        if kind not in OBS_ATTACKS:
            raise ValueError(f"unknown observation attack {kind!r}; known: {', '.join(OBS_ATTACKS)}")
        if epsilon < 0 or steps < 1:
            raise ValueError("epsilon must be >= 0 and steps >= 1")
        if timing_threshold is not None and not policy.discrete:
            raise ValueError("the strategically timed variant needs a discrete policy (preference gap)")
        self.policy, self.kind, self.epsilon, self.steps = policy, kind, float(epsilon), int(steps)
        self.obs_std = np.asarray(obs_std, dtype=np.float64).reshape(-1)
        if self.obs_std.shape != env.observation_space.shape:
            raise ValueError(f"obs_std has shape {self.obs_std.shape}, expected {env.observation_space.shape}")
        self.timing_threshold = timing_threshold
        self.attack_seed = int(seed)
        self.rng = np.random.default_rng([self.attack_seed, 0])
        space = env.observation_space
        self._low = np.asarray(space.low, dtype=np.float64)
        self._high = np.asarray(space.high, dtype=np.float64)

    @property
    def radius(self) -> np.ndarray:
        return self.epsilon * self.obs_std

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.rng = np.random.default_rng([self.attack_seed, 1, int(seed)])
        obs, info = self.env.reset(seed=seed, options=options)
        return self._attack(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._attack(obs, info)
        return obs, reward, terminated, truncated, info

    def _should_attack(self, s: np.ndarray) -> bool:
        if self.epsilon == 0:
            return False
        if self.timing_threshold is None:
            return True
        p = self.policy.action_probs(s)[0]
        return float(p.max() - p.min()) >= self.timing_threshold

    def _attack(self, obs: np.ndarray, info: dict) -> tuple[np.ndarray, dict]:
        s = np.asarray(obs, dtype=np.float64).reshape(1, -1)
        attacked = self._should_attack(s)
        s_hat = self.perturb(s) if attacked else s
        info = dict(info)
        info["attack"] = {"clean_obs": s[0].copy(), "attacked": attacked}
        return s_hat[0].astype(self.observation_space.dtype), info

    def perturb(self, s: np.ndarray) -> np.ndarray:
        """The attacked observation for a batch of clean observations ``s``."""
        r = np.broadcast_to(self.radius, s.shape)
        low, high = self._low, self._high
        if self.kind == "gaussian":
            return project(s + np.clip(self.rng.standard_normal(s.shape), -1.0, 1.0) * r, s, r, low, high)
        if self.kind == "mad":
            return pgd_max_kl(self.policy, s, r, self.steps, self.rng, low=low, high=high)
        pol = self.policy
        if not pol.discrete:  # Gaussian: the cross-entropy at the mean has zero gradient -> KL from a random start
            if self.kind == "fgsm":
                return _fgsm_gaussian(pol, s, r, self.rng, low, high)
            return pgd_max_kl(pol, s, r, self.steps, self.rng, low=low, high=high)
        target = pol.action_probs(s).argmax(axis=1)
        if self.kind == "fgsm":
            _, g = pol.grad_obs(s, target, loss="cross_entropy")
            return project(s + r * np.sign(g), s, r, low, high)
        # pgd: random start, signed steps of 2.5 eps / steps
        x = project(s + self.rng.uniform(-1.0, 1.0, s.shape) * r, s, r, low, high)
        for _ in range(self.steps):
            _, g = pol.grad_obs(x, target, loss="cross_entropy")
            x = project(x + (2.5 / self.steps) * r * np.sign(g), s, r, low, high)
        return x


def _fgsm_gaussian(policy: Policy, s, r, rng, low, high) -> np.ndarray:
    mean = policy.gaussian(s)[0]
    x0 = project(s + 0.1 * rng.uniform(-1.0, 1.0, s.shape) * r, s, r, low, high)
    _, g = policy.grad_obs(x0, mean, loss="kl")
    return project(s + r * np.sign(g), s, r, low, high)


class ActionAttack(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """PR-MDP action attack: with probability ``alpha`` the adversarial action is executed instead.

    The wrapper needs the observation the agent acted on; it remembers the last one it returned.
    """

    def __init__(self, env: gym.Env, policy: Policy, alpha: float, seed: int = 0,
                 timing_threshold: float | None = None) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, policy=policy, alpha=alpha, seed=seed,
                                                 timing_threshold=timing_threshold)
        gym.Wrapper.__init__(self, env)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if timing_threshold is not None and not policy.discrete:
            raise ValueError("the strategically timed variant needs a discrete policy (preference gap)")
        self.policy, self.alpha, self.attack_seed = policy, float(alpha), int(seed)
        self.timing_threshold = timing_threshold
        self.rng = np.random.default_rng([self.attack_seed, 0])
        self._last_obs: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.rng = np.random.default_rng([self.attack_seed, 1, int(seed)])
        obs, info = self.env.reset(seed=seed, options=options)
        self._last_obs = np.asarray(obs, dtype=np.float64)
        info = dict(info)
        info["attack"] = {"clean_obs": self._last_obs.copy(), "attacked": False}
        return obs, info

    def adversarial_action(self, s: np.ndarray):
        if self.policy.discrete:
            return int(self.policy.action_probs(s).argmin(axis=1)[0])
        center, _ = self.policy.spec.action_center_scale()
        mean = self.policy.gaussian(s)[0][0]
        space = self.action_space
        return np.clip(2.0 * center - mean, space.low, space.high).astype(space.dtype)

    def step(self, action):
        s = (np.zeros(self.observation_space.shape) if self._last_obs is None else self._last_obs).reshape(1, -1)
        draw = self.rng.random() < self.alpha
        if draw and self.timing_threshold is not None:
            p = self.policy.action_probs(s)[0]
            draw = float(p.max() - p.min()) >= self.timing_threshold
        executed = self.adversarial_action(s) if draw else action
        obs, reward, terminated, truncated, info = self.env.step(executed)
        self._last_obs = np.asarray(obs, dtype=np.float64)
        info = dict(info)
        info["attack"] = {"clean_obs": self._last_obs.copy(), "attacked": False,
                          "action_attacked": bool(draw), "intended_action": action, "executed_action": executed}
        return obs, reward, terminated, truncated, info


def make_attack(
    env: gym.Env,
    policy: Policy,
    name: str,
    epsilon: float,
    obs_std: np.ndarray | None = None,
    alpha: float | None = None,
    steps: int = 10,
    timing_threshold: float | None = None,
    seed: int = 0,
) -> gym.Env:
    """Wrap ``env`` with the named attack. ``action`` uses ``alpha`` (default: ``epsilon`` clipped to [0, 1])."""
    if name == "action":
        a = float(np.clip(epsilon, 0.0, 1.0)) if alpha is None else alpha
        return ActionAttack(env, policy, a, seed=seed, timing_threshold=timing_threshold)
    if obs_std is None:
        raise ValueError(f"attack {name!r} needs obs_std (per-dimension state std)")
    return ObservationAttack(env, policy, name, epsilon, obs_std, steps=steps,
                             timing_threshold=timing_threshold, seed=seed)


def estimate_obs_std(env: gym.Env, policy: Policy, episodes: int = 10, seed: int = 20_000,
                     floor: float = 1e-3) -> np.ndarray:
    """Per-dimension std of observations along ``policy``'s clean greedy rollouts (reset seeds seed+k)."""
    seen: list[np.ndarray] = []
    play_episodes(env, choose_actions(env.action_space, policy, seed), episodes, seed,
                  on_step=lambda step: seen.append(np.asarray(step.obs, dtype=np.float64)))
    return np.maximum(np.std(np.stack(seen), axis=0), floor)


def random_policy_std(env: gym.Env, min_states: int = 20_000, seed: int = 0, floor: float = 1e-3) -> np.ndarray:
    """Per-dimension std of the states a uniform random policy visits (reset seeds seed, seed+1, ...)."""
    act = choose_actions(env.action_space, None, seed)  # seeded once: episodes continue its sample stream
    seen: list[np.ndarray] = []
    k = 0
    while len(seen) < min_states:  # whole episodes until enough states
        play_episodes(env, act, 1, seed + k, on_step=lambda step: seen.append(np.asarray(step.obs, dtype=np.float64)))
        k += 1
    return np.maximum(np.std(np.stack(seen), axis=0), floor)


def reference_std(scenario) -> np.ndarray:
    """The scenario's fixed sigma: ``STATE_STD`` if listed, else the random-policy estimate."""
    if scenario.name in STATE_STD:
        return np.asarray(STATE_STD[scenario.name], dtype=np.float64)
    return random_std(scenario)


def random_std(scenario) -> np.ndarray:
    """The uniform random policy's state std (``RANDOM_POLICY_STD`` if listed, else estimated and cached)."""
    if scenario.name in RANDOM_POLICY_STD:
        return np.asarray(RANDOM_POLICY_STD[scenario.name], dtype=np.float64)
    if scenario.name not in _STD_CACHE:
        env = scenario.build_env(0, 0)
        try:
            _STD_CACHE[scenario.name] = np.maximum(np.round(random_policy_std(env), 3), 1e-3)
        finally:
            env.close()
    return _STD_CACHE[scenario.name].copy()

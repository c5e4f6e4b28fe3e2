"""What a federation trains on: environment, model shape, PPO and server settings.

A ``Scenario`` is the single object every node agrees on (by name), so it is
frozen and validated eagerly: a bad value should fail at load time on the
coordinator, not rounds later inside a participant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from scenarios.policy import Policy, PolicySpec
from scenarios.poly_net import PolyNetSpec
from scenarios.poly_policy import PolyPolicy
from scenarios.rollout import EnvironmentFailure

UpdateKind = Literal["pseudo-gradient", "gradient"]


def _finite_positive(x: float) -> bool:
    return isinstance(x, (int, float, np.floating)) and math.isfinite(x) and x > 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


RobustMode = Literal["none", "sa-ppo", "noise-injection", "reward-defense"]


@dataclass(frozen=True)
class RobustConfig:
    """Robust local training (docs/threat-lab.md). Everything here runs inside the participant.

    ``sa-ppo``: PPO loss + ``kappa`` * mean KL(pi(.|s) || pi(.|s_hat)), s_hat from ``attack_steps``
    PGD steps inside the l-inf ball of radius ``epsilon`` * sigma per dimension
    (``kappa`` ramps up linearly over ``kappa_ramp_rounds``).
    ``noise-injection``: the policy acts on and learns from s + N(0, (epsilon * sigma)^2).
    sigma is ``obs_std`` when given (a fixed per-dimension scale, e.g. the evaluation's
    ``fedhe.lab.policy_attacks.STATE_STD`` row, so training and evaluation budgets share units);
    empty: the local batch's own state std (sa-ppo) / a running std of local observations (noise).
    ``reward-defense``: rewards pass through a perturbed-reward correction (Wang, Liu & Li 2020)
    before learning. ``reward_flip_rate`` > 0 simulates tampered rewards at the participant
    (r -> -r with that probability) in any mode; it is an attack knob, not a defense.
    """

    mode: RobustMode = "none"
    kappa: float = 0.0
    epsilon: float = 0.0
    attack_steps: int = 5
    kappa_ramp_rounds: int = 0
    reward_flip_rate: float = 0.0
    reward_noise_std: float = 0.0
    obs_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_std", tuple(float(x) for x in self.obs_std))
        _require(
            all(math.isfinite(x) and x > 0 for x in self.obs_std),
            f"ppo.robust.obs_std must be finite and > 0, got {self.obs_std}",
        )
        _require(
            self.mode in ("none", "sa-ppo", "noise-injection", "reward-defense"),
            f"ppo.robust.mode must be none, sa-ppo, noise-injection or reward-defense, got {self.mode!r}",
        )
        for name in ("kappa", "epsilon", "reward_noise_std"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v >= 0, f"ppo.robust.{name} must be finite and >= 0, got {v}")
        _require(self.attack_steps >= 1, f"ppo.robust.attack_steps must be >= 1, got {self.attack_steps}")
        _require(self.kappa_ramp_rounds >= 0, "ppo.robust.kappa_ramp_rounds must be >= 0")
        _require(
            0.0 <= self.reward_flip_rate < 0.5,
            f"ppo.robust.reward_flip_rate must be in [0, 0.5), got {self.reward_flip_rate}",
        )


@dataclass(frozen=True)
class PPOConfig:
    """Local PPO hyperparameters (per participant, per round)."""

    num_envs: int = 8
    steps_per_env: int = 256
    epochs: int = 10
    minibatches: int = 4
    lr: float = 2.5e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    reward_scale: float = 1.0  # multiplies rewards for learning only; reported returns stay raw
    anneal_lr: bool = True  # linear decay of lr over the run's rounds (CleanRL's default), floor 10%
    robust: RobustConfig = RobustConfig()  # robust local training (participant-side only)

    def __post_init__(self) -> None:
        for name in ("num_envs", "steps_per_env", "epochs", "minibatches"):
            _require(getattr(self, name) >= 1, f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.minibatches <= self.batch_size,
            f"ppo.minibatches ({self.minibatches}) exceeds the batch size ({self.batch_size})",
        )
        for name in ("lr", "clip_coef", "max_grad_norm", "reward_scale"):
            _require(getattr(self, name) > 0, f"ppo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("ent_coef", "vf_coef"):
            _require(getattr(self, name) >= 0, f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        _require(isinstance(self.robust, RobustConfig), "ppo.robust must be a RobustConfig")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.steps_per_env


MODES = ("local-ppo", "encrypted-rollouts")


@dataclass(frozen=True)
class ServerOptimizer:
    """The coordinator's HE-Adam for one training mode: its public hyperparameters, declared once.

    ``clip_bound`` is the run's C: every participant clips its contribution to it (local PPO: the
    update's L2 norm; encrypted rollouts: every gradient coordinate), which is what keeps HE-Adam's
    polynomial in its interval and the aggregate within the integrity check's bound."""

    lr: float
    beta1: float
    beta2: float
    clip_bound: float
    interval_upper: float = 4.0  # B: HE-Adam's x stays in [beta2, B]
    # HE-SGD (--server-optimizer sgd, the linear baseline): its own step size, since without the
    # second moment a step is lr times the (momentum-averaged) gradient, not lr per coordinate.
    sgd_lr: float = 1.0

    def __post_init__(self) -> None:
        _require(_finite_positive(self.lr), f"server.lr must be > 0, got {self.lr}")
        _require(_finite_positive(self.sgd_lr), f"server.sgd_lr must be > 0, got {self.sgd_lr}")
        _require(0.0 <= self.beta1 < 1.0, f"server.beta1 must be in [0, 1), got {self.beta1}")
        _require(0.0 < self.beta2 < 1.0, f"server.beta2 must be in (0, 1), got {self.beta2}")
        _require(_finite_positive(self.clip_bound), f"server.clip_bound must be > 0, got {self.clip_bound}")
        _require(self.interval_upper > 1.0 and math.isfinite(self.interval_upper),
                 f"server.interval_upper (B) must be > 1, got {self.interval_upper}")


@dataclass(frozen=True)
class RolloutConfig:
    """The encrypted-rollout mode (docs/encrypted-rollouts.md): the polynomial network owners act
    with, what they compute on their own values, and the server optimizer that learns from their
    encrypted states and deltas (one gradient step per round, so PPO reduces to A2C)."""

    hidden: int = 16
    num_envs: int = 8
    steps_per_env: int = 256
    gamma: float = 0.99
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    obs_scale: tuple[float, ...] = ()  # per observation dimension; empty: finite space bounds, else 1
    obs_clip: float = 1.0  # scaled observations are clipped to [-obs_clip, obs_clip]: bounded inputs
    action_std: float = 0.5  # continuous actions: initial Gaussian std (then learned), in action half-ranges
    server: ServerOptimizer = ServerOptimizer(lr=0.05, beta1=0.9, beta2=0.99, clip_bound=2.0)
    rounds: int = 250

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_scale", tuple(float(x) for x in self.obs_scale))
        for name in ("hidden", "num_envs", "steps_per_env", "rounds"):
            _require(getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        _require(isinstance(self.server, ServerOptimizer), "rollout.server must be a ServerOptimizer")
        for name in ("obs_clip", "action_std"):
            _require(_finite_positive(getattr(self, name)), f"rollout.{name} must be > 0, got {getattr(self, name)}")
        _require(all(_finite_positive(x) for x in self.obs_scale), f"rollout.obs_scale must be > 0: {self.obs_scale}")

    @property
    def transitions(self) -> int:
        return self.num_envs * self.steps_per_env


@dataclass(frozen=True)
class Scenario:
    """A federated RL task. Give ``name`` and exactly one of ``env_id`` / ``make_env``.

    ``make_env`` is called as ``make_env(participant_index, seed, **kwargs)`` where
    kwargs are the participant's ``env_kwargs`` merged with the chosen variant;
    with ``env_id`` those kwargs go to ``gymnasium.make``.
    ``env_kwargs`` is one mapping for everybody or a sequence indexed by
    participant index modulo its length (heterogeneous organisations).
    ``reward_threshold`` defaults to the Gymnasium registration's for ``env_id``
    scenarios and stays None (never "solved") for ``make_env`` unless given.
    ``server`` is the coordinator's optimizer in local-PPO mode (``rollout.server`` in the
    encrypted-rollout mode); its defaults match the tuned CartPole scenario.
    """

    name: str
    env_id: str | None = None
    make_env: Callable[..., gym.Env] | None = None
    env_kwargs: Sequence[Mapping[str, Any]] | Mapping[str, Any] = ()
    env_variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    num_participants: int = 3
    rounds: int = 150
    seed: int = 0
    hidden: tuple[int, ...] = (64,)
    ppo: PPOConfig = PPOConfig()
    update: UpdateKind = "pseudo-gradient"
    he_profile: str = "n16k-d6"
    server: ServerOptimizer = ServerOptimizer(lr=0.2, beta1=0.5, beta2=0.99, clip_bound=2.0)  # local-ppo mode
    reward_threshold: float | None = None
    # Threat lab: misbehaving participants, e.g. ({"attack": "sign-flip", "participants": [0, 1, 2], "k": 2.5},).
    # Behaviours and their parameters are defined (and fully validated) in participant/malicious.py.
    party_mix: Sequence[Mapping[str, Any]] = ()
    rollout: RolloutConfig = RolloutConfig()  # the encrypted-rollout mode's network and server optimizer
    _spec_cache: dict[str, PolicySpec] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", "Scenario.name must be a non-empty string")
        _require(
            (self.env_id is None) != (self.make_env is None),
            f"scenario {self.name!r}: give exactly one of env_id or make_env",
        )
        _require(self.make_env is None or callable(self.make_env), f"scenario {self.name!r}: make_env must be callable")
        self._validate_kwargs()
        self._validate_party_mix()
        _require(self.num_participants >= 1, f"scenario {self.name!r}: num_participants must be >= 1")
        _require(self.rounds >= 1, f"scenario {self.name!r}: rounds must be >= 1")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _require(
            len(self.hidden) >= 1 and all(isinstance(h, int) and h > 0 for h in self.hidden),
            f"scenario {self.name!r}: hidden must be a non-empty tuple of positive ints, got {self.hidden}",
        )
        _require(isinstance(self.ppo, PPOConfig), f"scenario {self.name!r}: ppo must be a PPOConfig")
        _require(
            self.update in ("pseudo-gradient", "gradient"),
            f"scenario {self.name!r}: update must be 'pseudo-gradient' or 'gradient', got {self.update!r}",
        )
        _require(
            isinstance(self.he_profile, str) and self.he_profile != "", f"scenario {self.name!r}: he_profile is empty"
        )
        _require(isinstance(self.server, ServerOptimizer), f"scenario {self.name!r}: server must be a ServerOptimizer")
        if self.env_id is not None:
            try:
                spec = gym.spec(self.env_id)
            except gym.error.Error as exc:
                raise ValueError(
                    f"scenario {self.name!r}: {self.env_id!r} is not a registered Gymnasium id ({exc})"
                ) from exc
            if self.reward_threshold is None:
                object.__setattr__(self, "reward_threshold", spec.reward_threshold)

    def _validate_kwargs(self) -> None:
        kw = self.env_kwargs
        if not isinstance(kw, Mapping):
            _require(
                isinstance(kw, Sequence) and not isinstance(kw, str) and all(isinstance(k, Mapping) for k in kw),
                f"scenario {self.name!r}: env_kwargs must be a mapping or a sequence of mappings",
            )
            object.__setattr__(self, "env_kwargs", tuple(kw))
        _require(
            isinstance(self.env_variants, Mapping) and all(isinstance(v, Mapping) for v in self.env_variants.values()),
            f"scenario {self.name!r}: env_variants must map names to kwargs mappings",
        )

    def _validate_party_mix(self) -> None:
        mix = self.party_mix
        _require(
            isinstance(mix, Sequence) and not isinstance(mix, str) and all(isinstance(m, Mapping) for m in mix),
            f"scenario {self.name!r}: party_mix must be a sequence of mappings",
        )
        for entry in mix:
            _require(
                isinstance(entry.get("attack"), str) and entry["attack"] != "",
                f"scenario {self.name!r}: every party_mix entry needs an 'attack' name, got {dict(entry)}",
            )
            who = entry.get("participants")
            _require(
                isinstance(who, Sequence)
                and not isinstance(who, str)
                and all(isinstance(i, int) and i >= 0 for i in who),
                f"scenario {self.name!r}: party_mix 'participants' must be a list of participant indices, got {who!r}",
            )
        object.__setattr__(self, "party_mix", tuple(dict(m) for m in mix))

    # ----- environments --------------------------------------------------
    def env_kwargs_for(self, participant_index: int, variant: str | None = None) -> dict[str, Any]:
        """The participant's kwargs, overridden by the named variant's."""
        if participant_index < 0:
            raise ValueError(f"participant_index must be >= 0, got {participant_index}")
        kw = self.env_kwargs
        base = dict(kw) if isinstance(kw, Mapping) else (dict(kw[participant_index % len(kw)]) if kw else {})
        if variant is not None:
            if variant not in self.env_variants:
                known = ", ".join(sorted(self.env_variants)) or "none"
                raise ValueError(f"scenario {self.name!r} has no env variant {variant!r} (known: {known})")
            base.update(self.env_variants[variant])
        return base

    def build_env(self, participant_index: int, seed: int, variant: str | None = None) -> gym.Env:
        """One environment; ``seed`` seeds the action space (episodes are seeded at reset)."""
        kwargs = self.env_kwargs_for(participant_index, variant)
        if self.make_env is not None:
            env = self.make_env(participant_index, seed, **kwargs)
        else:
            env = gym.make(self.env_id, **kwargs)
        env.action_space.seed(seed)
        return env

    def build_vector_env(
        self, participant_index: int, seed: int, variant: str | None = None, num_envs: int | None = None
    ) -> gym.vector.VectorEnv:
        """``num_envs`` (default ``ppo.num_envs``) copies with same-step autoreset and episode statistics.

        Same-step autoreset puts the pre-reset observation in ``info["final_obs"]``
        so truncated episodes can be bootstrapped without a dummy reset step.
        """
        count = num_envs or self.ppo.num_envs
        fns = [(lambda k=k: self.build_env(participant_index, seed + k, variant)) for k in range(count)]
        try:
            vec = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        except Exception as exc:
            raise EnvironmentFailure("building the environments failed") from exc
        return gym.wrappers.vector.RecordEpisodeStatistics(vec)

    def policy_spec(self) -> PolicySpec:
        """Network shapes, read from one freshly built environment (cached)."""
        if "spec" not in self._spec_cache:
            env = self.build_env(0, self.seed)
            try:
                self._spec_cache["spec"] = _spec_from_spaces(env.observation_space, env.action_space, self.hidden)
            finally:
                env.close()
        return self._spec_cache["spec"]

    def poly_spec(self) -> PolyNetSpec:
        """The encrypted-rollout mode's polynomial actor-critic for this environment."""
        spec = self.policy_spec()
        return PolyNetSpec(spec.obs_dim, self.rollout.hidden, spec.action_dim, spec.action_kind == "continuous",
                           math.log(self.rollout.action_std))

    def network(self, mode: str) -> PolicySpec | PolyNetSpec:
        """The shared parameter vector's network in ``mode`` (``num_params``, ``init(seed)``)."""
        _require(mode in MODES, f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        return self.policy_spec() if mode == "local-ppo" else self.poly_spec()

    def server_optimizer(self, mode: str) -> ServerOptimizer:
        """The coordinator's optimizer in ``mode`` (encrypted rollouts learn from raw gradients: their own)."""
        _require(mode in MODES, f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        return self.server if mode == "local-ppo" else self.rollout.server

    def steps_per_round(self, mode: str) -> int:
        """Environment steps one participant collects per round in ``mode`` (public)."""
        return self.ppo.batch_size if mode == "local-ppo" else self.rollout.transitions

    def make_policy(self, mode: str, theta: np.ndarray) -> Policy | PolyPolicy:
        """An acting policy (``act``, ``value``) for the trained ``theta`` of a run in ``mode``."""
        if mode == "local-ppo":
            return Policy(self.policy_spec(), theta)
        spec = self.network(mode)
        return PolyPolicy(spec, theta, self.rollout_obs_scale(), self.rollout.obs_clip,
                          *self.policy_spec().action_center_scale())

    def rollout_obs_scale(self) -> np.ndarray:
        """Per-dimension observation scale of the encrypted-rollout mode: ``rollout.obs_scale`` or
        the observation space's finite bounds (1 where unbounded)."""
        if self.rollout.obs_scale:
            return np.asarray(self.rollout.obs_scale, dtype=np.float64)
        if "obs_high" not in self._spec_cache:
            env = self.build_env(0, self.seed)
            try:
                self._spec_cache["obs_high"] = np.asarray(env.observation_space.high, dtype=np.float64)
            finally:
                env.close()
        high = np.abs(self._spec_cache["obs_high"])
        return np.where(np.isfinite(high) & (high > 0), high, 1.0)

    def with_overrides(self, **overrides: Any) -> Scenario:
        return dataclasses.replace(self, **overrides)


def _spec_from_spaces(obs_space: gym.Space, action_space: gym.Space, hidden: tuple[int, ...]) -> PolicySpec:
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"only flat Box observations are supported, got {obs_space}")
    if isinstance(action_space, gym.spaces.Discrete):
        return PolicySpec(obs_space.shape[0], "discrete", int(action_space.n), hidden)
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return PolicySpec(
            obs_space.shape[0],
            "continuous",
            action_space.shape[0],
            hidden,
            tuple(float(x) for x in action_space.low),
            tuple(float(x) for x in action_space.high),
        )
    raise ValueError(f"only Discrete or flat Box actions are supported, got {action_space}")

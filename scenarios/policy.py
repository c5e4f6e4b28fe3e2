"""Actor-critic MLP policy in pure NumPy (float64) with hand-written backprop.

All parameters live in one flat vector ``theta`` because that is what gets
clipped, encrypted and aggregated; layer matrices are views into it.  Layout:
actor layers (W, b)..., then the Gaussian log-std (continuous only), then
critic layers (W, b).... Hidden layers use tanh, output layers are linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ActionKind = Literal["discrete", "continuous"]
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class PolicySpec:
    """Shapes of the actor-critic; ``action_low/high`` scale Gaussian actions."""

    obs_dim: int
    action_kind: ActionKind
    action_dim: int
    hidden: tuple[int, ...] = (64,)
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.obs_dim <= 0 or self.action_dim <= 0:
            raise ValueError("obs_dim and action_dim must be positive")
        if self.action_kind not in ("discrete", "continuous"):
            raise ValueError(f"action_kind must be 'discrete' or 'continuous', got {self.action_kind!r}")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @property
    def actor_sizes(self) -> list[int]:
        return [self.obs_dim, *self.hidden, self.action_dim]

    @property
    def critic_sizes(self) -> list[int]:
        return [self.obs_dim, *self.hidden, 1]

    @property
    def num_log_std(self) -> int:
        return self.action_dim if self.action_kind == "continuous" else 0

    @property
    def num_params(self) -> int:
        def mlp(sizes: list[int]) -> int:
            return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))

        return mlp(self.actor_sizes) + self.num_log_std + mlp(self.critic_sizes)

    def action_center_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """Affine map from the network's unit-scale output to action units.

        Unbounded (or unspecified) dimensions get center 0 and scale 1.
        """
        center = np.zeros(self.action_dim)
        scale = np.ones(self.action_dim)
        if self.action_low is not None and self.action_high is not None:
            low = np.asarray(self.action_low, dtype=np.float64)
            high = np.asarray(self.action_high, dtype=np.float64)
            bounded = np.isfinite(low) & np.isfinite(high)
            center[bounded] = (low[bounded] + high[bounded]) / 2.0
            scale[bounded] = (high[bounded] - low[bounded]) / 2.0
        return center, scale

    def unflatten(self, theta: np.ndarray) -> Params:
        """Split a flat vector into layer views (writes go through to ``theta``)."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        pos = 0

        def take(shape: tuple[int, ...]) -> np.ndarray:
            nonlocal pos
            size = int(np.prod(shape))
            view = theta[pos : pos + size].reshape(shape)
            pos += size
            return view

        actor = [(take((a, b)), take((b,))) for a, b in zip(self.actor_sizes[:-1], self.actor_sizes[1:])]
        log_std = take((self.num_log_std,))
        critic = [(take((a, b)), take((b,))) for a, b in zip(self.critic_sizes[:-1], self.critic_sizes[1:])]
        return Params(actor=actor, log_std=log_std, critic=critic)

    def init(self, seed: int) -> np.ndarray:
        """CleanRL-style init: orthogonal weights, zero biases, tiny last actor layer."""
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.num_params)
        params = self.unflatten(theta)
        for layers, last_gain in ((params.actor, 0.01), (params.critic, 1.0)):
            for k, (w, _) in enumerate(layers):
                gain = last_gain if k == len(layers) - 1 else math.sqrt(2.0)
                w[...] = _orthogonal(w.shape, gain, rng)
        return theta


@dataclass
class Params:
    actor: list[tuple[np.ndarray, np.ndarray]]
    log_std: np.ndarray
    critic: list[tuple[np.ndarray, np.ndarray]]


def _orthogonal(shape: tuple[int, int], gain: float, rng: np.random.Generator) -> np.ndarray:
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q[:rows, :cols]


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return the linear output and every layer input (for backprop)."""
    inputs = [x]
    for w, b in layers[:-1]:
        x = np.tanh(x @ w + b)
        inputs.append(x)
    w, b = layers[-1]
    return x @ w + b, inputs


def _backward(
    layers: list[tuple[np.ndarray, np.ndarray]],
    grads: list[tuple[np.ndarray, np.ndarray]] | None,
    inputs: list[np.ndarray],
    g_out: np.ndarray,
) -> np.ndarray:
    """Accumulate dL/dW, dL/db into ``grads`` (if given); return dL/d(input)."""
    g = g_out
    for k in range(len(layers) - 1, -1, -1):
        w, _ = layers[k]
        x = inputs[k]
        if grads is not None:
            grads[k][0][...] += x.T @ g
            grads[k][1][...] += g.sum(axis=0)
        g = g @ w.T
        if k > 0:
            g = g * (1.0 - x * x)  # x is the tanh output of layer k-1
    return g


@dataclass(frozen=True)
class PPOBatch:
    """One minibatch for the clipped PPO objective."""

    obs: np.ndarray
    actions: np.ndarray
    old_log_probs: np.ndarray
    advantages: np.ndarray
    returns: np.ndarray


@dataclass(frozen=True)
class PPOLossInfo:
    loss: float
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float


class Policy:
    """Actor-critic evaluated at a fixed flat parameter vector ``theta``."""

    def __init__(self, spec: PolicySpec, theta: np.ndarray) -> None:
        self.spec = spec
        self.theta = np.asarray(theta, dtype=np.float64)
        self.params = spec.unflatten(self.theta)
        self._center, self._scale = spec.action_center_scale()

    # ----- distribution -------------------------------------------------
    @property
    def discrete(self) -> bool:
        return self.spec.action_kind == "discrete"

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        return np.atleast_2d(np.asarray(obs, dtype=np.float64))

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Raw actor output: logits (discrete) or unit-scale Gaussian mean (continuous)."""
        return _forward(self.params.actor, self._obs(obs))[0]

    def action_probs(self, obs: np.ndarray) -> np.ndarray:
        """Categorical probabilities, shape (batch, n_actions)."""
        self._require(discrete=True)
        return _softmax(self.logits(obs))

    def gaussian(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) in action units, shapes (batch, action_dim) and (action_dim,)."""
        self._require(discrete=False)
        u = self.logits(obs)
        return self._center + self._scale * u, self._scale * np.exp(self.params.log_std)

    def value(self, obs: np.ndarray) -> np.ndarray:
        return _forward(self.params.critic, self._obs(obs))[0][:, 0]

    def act(self, obs: np.ndarray, rng: np.random.Generator, greedy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Sample (or pick the mode of) actions; returns (actions, log_probs).

        Continuous actions are returned unclipped; the caller clips when stepping.
        """
        out = self.logits(obs)
        if self.discrete:
            probs = _softmax(out)
            if greedy:
                actions = probs.argmax(axis=1)
            else:
                u = rng.random((probs.shape[0], 1))
                actions = np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)
            return actions, self._log_prob_from(out, actions)
        mean = self._center + self._scale * out
        std = self._scale * np.exp(self.params.log_std)
        actions = mean if greedy else mean + std * rng.standard_normal(mean.shape)
        return actions, self._log_prob_from(out, actions)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return self._log_prob_from(self.logits(obs), actions)

    def entropy(self, obs: np.ndarray) -> np.ndarray:
        out = self.logits(obs)
        if self.discrete:
            return _categorical_entropy(_log_softmax(out))
        per_dim = self.params.log_std + np.log(self._scale) + 0.5 * (1.0 + _LOG_2PI)
        return np.full(out.shape[0], per_dim.sum())

    def _log_prob_from(self, out: np.ndarray, actions: np.ndarray) -> np.ndarray:
        if self.discrete:
            logp = _log_softmax(out)
            return logp[np.arange(out.shape[0]), np.asarray(actions, dtype=np.int64)]
        z = self._z(out, actions)
        log_std = self.params.log_std + np.log(self._scale)
        return (-0.5 * z * z - log_std - 0.5 * _LOG_2PI).sum(axis=1)

    def _z(self, out: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Standardised action noise (a - mean) / std."""
        actions = np.asarray(actions, dtype=np.float64).reshape(out.shape)
        return (actions - self._center - self._scale * out) / (self._scale * np.exp(self.params.log_std))

    def _require(self, discrete: bool) -> None:
        if self.discrete != discrete:
            raise TypeError(f"not available for a {self.spec.action_kind} policy")

    # ----- PPO loss and gradient -----------------------------------------
    def ppo_loss_and_grad(
        self, batch: PPOBatch, clip_coef: float, ent_coef: float, vf_coef: float
    ) -> tuple[PPOLossInfo, np.ndarray]:
        """Clipped PPO loss (mean over the batch) and its exact gradient w.r.t. theta.

        loss = -mean(min(r A, clip(r) A)) - ent_coef * mean(H) + vf_coef * 0.5 * mean((V - R)^2)
        """
        n = batch.obs.shape[0]
        obs = self._obs(batch.obs)
        grad = np.zeros_like(self.theta)
        g_params = self.spec.unflatten(grad)

        out, a_inputs = _forward(self.params.actor, obs)
        new_logp = self._log_prob_from(out, batch.actions)
        log_ratio = new_logp - batch.old_log_probs
        ratio = np.exp(log_ratio)
        adv = batch.advantages
        clipped = np.clip(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
        surrogate = np.minimum(ratio * adv, clipped * adv)
        policy_loss = -surrogate.mean()
        # The min picks the unclipped term exactly when r*A <= clip(r)*A; only then does r carry gradient.
        g_logp = np.where(ratio * adv <= clipped * adv, -adv * ratio, 0.0) / n

        if self.discrete:
            log_p = _log_softmax(out)
            p = np.exp(log_p)
            ent = _categorical_entropy(log_p)
            onehot = np.zeros_like(out)
            onehot[np.arange(n), np.asarray(batch.actions, dtype=np.int64)] = 1.0
            g_out = g_logp[:, None] * (onehot - p)
            # dH/dlogits = -p * (log p + H)
            g_out += (ent_coef / n) * p * (log_p + ent[:, None])
        else:
            z = self._z(out, batch.actions)
            std_unit = np.exp(self.params.log_std)
            g_out = g_logp[:, None] * z / std_unit
            g_params.log_std[...] = (g_logp[:, None] * (z * z - 1.0)).sum(axis=0) - ent_coef
            ent = np.full(n, (self.params.log_std + np.log(self._scale) + 0.5 * (1.0 + _LOG_2PI)).sum())
        _backward(self.params.actor, g_params.actor, a_inputs, g_out)

        values, c_inputs = _forward(self.params.critic, obs)
        err = values[:, 0] - batch.returns
        value_loss = 0.5 * float(np.mean(err * err))
        _backward(self.params.critic, g_params.critic, c_inputs, (vf_coef / n) * err[:, None])

        entropy = float(ent.mean())
        info = PPOLossInfo(
            loss=policy_loss - ent_coef * entropy + vf_coef * value_loss,
            policy_loss=float(policy_loss),
            value_loss=value_loss,
            entropy=entropy,
            approx_kl=float(np.mean((ratio - 1.0) - log_ratio)),
            clip_fraction=float(np.mean(np.abs(ratio - 1.0) > clip_coef)),
        )
        return info, grad

    # ----- input gradients (adversarial attacks) -------------------------
    def grad_obs(
        self, obs: np.ndarray, target: np.ndarray, loss: Literal["cross_entropy", "kl"] = "cross_entropy"
    ) -> tuple[float, np.ndarray]:
        """Scalar attack loss summed over the batch and its gradient w.r.t. the observations.

        ``cross_entropy``: -sum log pi(target_i | s_i), target = actions.
        ``kl``: sum KL(ref_i || pi(.|s_i)); target = reference probabilities (discrete)
        or reference means in action units (continuous, same std, so KL = sum (mu - mu_ref)^2 / 2 std^2).
        Summing (not averaging) keeps each sample's gradient independent of the batch size.
        """
        obs = self._obs(obs)
        out, inputs = _forward(self.params.actor, obs)
        target = np.asarray(target)
        if self.discrete:
            log_p = _log_softmax(out)
            p = np.exp(log_p)
            if loss == "cross_entropy":
                ref = np.zeros_like(out)
                ref[np.arange(out.shape[0]), target.astype(np.int64).reshape(-1)] = 1.0
                value = -float((ref * log_p).sum())
            elif loss == "kl":
                ref = np.atleast_2d(target.astype(np.float64))
                value = float((ref * (np.log(np.where(ref > 0, ref, 1.0)) - log_p)).sum())
            else:
                raise ValueError(f"unknown loss {loss!r}")
            g_out = p - ref
        else:
            std_unit = np.exp(self.params.log_std)
            if loss == "cross_entropy":
                z = self._z(out, target)
                value = -float(self._log_prob_from(out, target).sum())
                g_out = -z / std_unit
            elif loss == "kl":
                ref_u = (np.asarray(target, dtype=np.float64).reshape(out.shape) - self._center) / self._scale
                diff = (out - ref_u) / (std_unit * std_unit)
                value = float(0.5 * ((out - ref_u) ** 2 / (std_unit * std_unit)).sum())
                g_out = diff
            else:
                raise ValueError(f"unknown loss {loss!r}")
        return value, _backward(self.params.actor, None, inputs, g_out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _categorical_entropy(log_p: np.ndarray) -> np.ndarray:
    return -(np.exp(log_p) * log_p).sum(axis=1)

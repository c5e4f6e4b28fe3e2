"""A polynomial actor-critic for encrypted-rollout training (plain NumPy, float64).

Encrypted-rollout mode has the untrusted coordinator backpropagate through the network on CKKS
ciphertexts, which offer only additions and multiplications. So the network is a polynomial:
an actor ``obs_dim -> hidden -> num_outputs`` and a critic ``obs_dim -> hidden -> 1``, each with
the activation ``a(z) = z + z**2`` in its hidden layer and a linear output. ``z + z**2`` costs the
same multiplicative depth as ``z**2`` but, unlike it, is not even: a zero-bias ``z**2`` network is
an even function of the state, and CartPole's policy must be odd.

The actor's outputs are logits (discrete actions, any number) or Gaussian means (continuous). A
continuous actor also has a state-independent log standard deviation per action dimension
(``actor_log_std``), trained with the rest of theta: its gradient is a sum of per-transition terms
the owner computes on its own values (``d_log_std``), so it adds nothing non-polynomial to the
coordinator's part.

Flat parameter layout (``theta``), in this order:

====================  ============================  ==============================
block                 shape                         stored
====================  ============================  ==============================
actor ``W1``          ``(hidden, obs_dim)``         row-major
actor ``b1``          ``(hidden,)``
actor ``W2``          ``(num_outputs, hidden)``     row-major
actor ``b2``          ``(num_outputs,)``
actor ``log_std``     ``(num_outputs,)``                continuous actions only
critic ``W1``         ``(hidden, obs_dim)``         row-major
critic ``b1``         ``(hidden,)``
critic ``W2``         ``(1, hidden)``
critic ``b2``         ``(1,)``
====================  ============================  ==============================

``protos.rollout_layout.BlockLayout`` relies on exactly this order (it cannot import this module,
so it recomputes the offsets from the same dimensions; the tests check that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAM_NAMES = ("actor_W1", "actor_b1", "actor_W2", "actor_b2", "actor_log_std", "critic_W1", "critic_b1", "critic_W2",
               "critic_b2")


@dataclass(frozen=True)
class PolyNetSpec:
    """Shapes of the polynomial actor-critic (see the module docstring for the layout)."""

    obs_dim: int
    hidden: int
    num_outputs: int
    continuous: bool = False
    initial_log_std: float = 0.0  # continuous: log of the initial standard deviation, in unit action scale

    def __post_init__(self) -> None:
        if min(self.obs_dim, self.hidden, self.num_outputs) < 1:
            raise ValueError(
                f"obs_dim, hidden and num_outputs must be positive, got {self.obs_dim}, {self.hidden}, "
                f"{self.num_outputs}"
            )

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter block's shape, in layout order."""
        d, h, a = self.obs_dim, self.hidden, self.num_outputs
        return {
            "actor_W1": (h, d),
            "actor_b1": (h,),
            "actor_W2": (a, h),
            "actor_b2": (a,),
            **({"actor_log_std": (a,)} if self.continuous else {}),
            "critic_W1": (h, d),
            "critic_b1": (h,),
            "critic_W2": (1, h),
            "critic_b2": (1,),
        }

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes.values())

    def unpack(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector into named views (writes go through to ``theta``)."""
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        views, pos = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            views[name] = theta[pos : pos + size].reshape(shape)
            pos += size
        return views

    def init(self, seed: int, actor_gain: float = 0.01, critic_gain: float = 0.1) -> np.ndarray:
        """Random first layers with ``|z| <= 1`` on ``[-1, 1]^obs_dim``, zero biases, tiny output layers.

        Each first-layer row is a random direction of L2 norm ``1/sqrt(obs_dim)``; since
        ``|x|_2 <= sqrt(obs_dim)`` on the unit box, every pre-activation satisfies ``|z| <= 1``, so
        ``a(z) = z + z^2`` stays in ``[-1/4, 2]``. Output rows are random directions of norm
        ``actor_gain`` and ``critic_gain``.
        """
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.num_params)
        p = self.unpack(theta)
        for net in ("actor", "critic"):
            p[f"{net}_W1"][...] = _unit_rows(rng, (self.hidden, self.obs_dim)) / np.sqrt(self.obs_dim)
        p["actor_W2"][...] = _unit_rows(rng, (self.num_outputs, self.hidden)) * actor_gain
        p["critic_W2"][...] = _unit_rows(rng, (1, self.hidden)) * critic_gain
        if self.continuous:
            p["actor_log_std"][...] = self.initial_log_std
        return theta

    def std(self, theta: np.ndarray) -> np.ndarray:
        """A continuous actor's standard deviation per action dimension (unit action scale)."""
        return np.exp(self.unpack(np.asarray(theta, dtype=np.float64))["actor_log_std"])

    def forward(self, theta: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Actor outputs ``(T, num_outputs)`` and critic values ``(T,)`` for observations ``(T, obs_dim)``."""
        p, x = self.unpack(np.asarray(theta, dtype=np.float64)), self._obs(obs)
        outputs = _layer_out(p, "actor", x)[1]
        values = _layer_out(p, "critic", x)[1][:, 0]
        return outputs, values

    def gradient(self, theta: np.ndarray, obs: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray,
                 d_log_std: np.ndarray | None = None) -> np.ndarray:
        """Gradient w.r.t. theta of ``sum_i d_actor[i] . outputs_i + d_critic[i] * values_i``, plus
        ``sum_i d_log_std[i]`` for a continuous actor's log standard deviation.

        That is backprop of given loss-layer deltas: the owner computes ``dL/d outputs``,
        ``dL/d values`` and ``dL/d log_std`` (softmax, log, clipping: everything non-polynomial) on its
        own values.
        """
        p, x = self.unpack(np.asarray(theta, dtype=np.float64)), self._obs(obs)
        t = x.shape[0]
        d_actor = np.asarray(d_actor, dtype=np.float64).reshape(t, self.num_outputs)
        d_critic = np.asarray(d_critic, dtype=np.float64).reshape(t, 1)
        grad = np.zeros(self.num_params)
        g = self.unpack(grad)
        for net, delta in (("actor", d_actor), ("critic", d_critic)):
            z, _ = _layer_out(p, net, x)
            h = z + z * z
            g[f"{net}_W2"][...] = delta.T @ h
            g[f"{net}_b2"][...] = delta.sum(axis=0)
            q = (delta @ p[f"{net}_W2"]) * (2.0 * z + 1.0)
            g[f"{net}_W1"][...] = q.T @ x
            g[f"{net}_b1"][...] = q.sum(axis=0)
        if self.continuous and d_log_std is not None:
            g["actor_log_std"][...] = np.asarray(d_log_std, dtype=np.float64).reshape(t, self.num_outputs).sum(axis=0)
        return grad

    def gradient_bounds(self, theta: np.ndarray) -> tuple[float, float]:
        """Per-transition bounds ``(L_actor, L_critic)`` on every gradient coordinate, for states in ``[-1, 1]^d``.

        For observations in the unit box, every actor coordinate of ``gradient(...)`` is at most
        ``L_actor * sum_i |d_actor[i]|_1`` in magnitude and every critic coordinate at most
        ``L_critic * sum_i |d_critic[i]|``. An owner that scales its deltas so both products stay
        below ``C / n`` keeps the summed gradient of ``n`` owners within HE-Adam's clipping bound
        ``C`` (docs/he-adam.md, "The interval guarantee") without clipping anything on ciphertexts.

        With ``Z_k = |W1[k]|_1 + |b1[k]| >= |z_k|``: ``|d out / d b2| <= 1``,
        ``|d out / d W2[a, k]| <= Z_k + Z_k^2`` and ``|d out / d W1[k, j]|, |d out / d b1[k]| <=
        max_a |W2[a, k]| (2 Z_k + 1)``.
        """
        p = self.unpack(np.asarray(theta, dtype=np.float64))
        bounds = []
        for net in ("actor", "critic"):
            zmax = np.abs(p[f"{net}_W1"]).sum(axis=1) + np.abs(p[f"{net}_b1"])
            w2max = np.abs(p[f"{net}_W2"]).max(axis=0)
            bounds.append(float(max(1.0, np.max(zmax + zmax**2), np.max(w2max * (2 * zmax + 1)))))
        return bounds[0], bounds[1]

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(obs, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise ValueError(f"observations must have shape (T, {self.obs_dim}), got {np.shape(obs)}")
        return x


def _layer_out(p: dict[str, np.ndarray], net: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activations z ``(T, hidden)`` and linear outputs ``(T, outputs)`` of one network."""
    z = x @ p[f"{net}_W1"].T + p[f"{net}_b1"]
    return z, (z + z * z) @ p[f"{net}_W2"].T + p[f"{net}_b2"]


def _unit_rows(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    rows = rng.standard_normal(shape)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


__all__ = ["PARAM_NAMES", "PolyNetSpec"]

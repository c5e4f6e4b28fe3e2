"""Acting with the encrypted-rollout mode's polynomial network (what owners run locally).

Observations are scaled per dimension and clipped before the network sees them: bounded inputs
keep the polynomial activation tame and are what HE-Adam's interval argument relies on. The owner
encrypts exactly these scaled observations. Discrete actions: softmax over the actor's logits;
continuous actions: a Gaussian around the actor's (unit-scale) means with theta's learned std.
"""

from __future__ import annotations

import numpy as np

from scenarios.poly_net import PolyNetSpec


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class PolyPolicy:
    """Same acting interface as ``scenarios.Policy`` (``act``, ``value``), for ``PolyNetSpec`` weights."""

    def __init__(
        self,
        spec: PolyNetSpec,
        theta: np.ndarray,
        obs_scale: np.ndarray,
        obs_clip: float,
        action_center: np.ndarray,
        action_scale: np.ndarray,
    ) -> None:
        self.spec, self.theta = spec, np.asarray(theta, dtype=np.float64)
        self.obs_scale, self.obs_clip = np.asarray(obs_scale, dtype=np.float64), float(obs_clip)
        self.center, self.scale = action_center, action_scale
        self.std = spec.std(self.theta) if spec.continuous else None

    def features(self, obs: np.ndarray) -> np.ndarray:
        """What the network (and the coordinator, encrypted) sees: scaled, clipped observations."""
        return np.clip(np.asarray(obs, dtype=np.float64) / self.obs_scale, -self.obs_clip, self.obs_clip)

    def forward(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(actor outputs, values) of already scaled observations."""
        return self.spec.forward(self.theta, features)

    def outputs(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward(self.features(obs))

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.outputs(obs)[1]

    def act(self, obs: np.ndarray, rng: np.random.Generator, greedy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(actions, log-probabilities); continuous actions in env units, unclipped."""
        out, _ = self.outputs(obs)
        if not self.spec.continuous:
            p = softmax(out)
            if greedy:
                actions = p.argmax(axis=1)
            else:
                actions = (rng.random((p.shape[0], 1)) > np.cumsum(p, axis=1)).sum(axis=1)
                actions = np.minimum(actions, p.shape[1] - 1)
            return actions, np.log(p[np.arange(p.shape[0]), actions] + 1e-12)
        unit = out if greedy else out + self.std * rng.standard_normal(out.shape)
        logp = -0.5 * (((unit - out) / self.std) ** 2 + np.log(2 * np.pi * self.std**2)).sum(axis=1)
        return self.center + self.scale * unit, logp

    def unit_actions(self, actions: np.ndarray) -> np.ndarray:
        """Continuous env actions back in the network's unit scale (for the owner's deltas)."""
        return (np.asarray(actions, dtype=np.float64) - self.center) / self.scale

"""HE-Adam's optimizer in NumPy: the plaintext reference the benchmarks and tests compare with.

Plain Adam without bias correction and with ``tau`` inside the square root, as
``coordinator.he_adam`` computes it on ciphertexts (docs/he-adam.md, "The optimizer being
computed"). ``v`` here is Adam's own second moment; the coordinator keeps ``z = (v + tau) / tau``.
"""

from __future__ import annotations

import numpy as np

from protos.optimizer import HEAdamConfig


class NumpyAdam:
    """The same Adam in NumPy (no bias correction, tau in the denominator): the plaintext reference."""

    def __init__(self, size: int, config: HEAdamConfig) -> None:
        self.config, self.m, self.v = config, np.zeros(size), np.zeros(size)
        self.w = np.full(size, config.tau_value**-0.5)

    def step(self, theta: np.ndarray, g: np.ndarray) -> np.ndarray:
        c = self.config
        self.m = c.beta1 * self.m + (1 - c.beta1) * g
        self.v = c.beta2 * self.v + (1 - c.beta2) * g**2
        self.w = (self.v + c.tau_value) ** -0.5
        return theta - c.lr * self.m * self.w


def reference_adam(
    theta0: np.ndarray, grads: list[np.ndarray], config: HEAdamConfig
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """NumpyAdam over a gradient sequence: final theta, and w_t, v_t per step."""
    theta, adam = theta0.astype(np.float64).copy(), NumpyAdam(theta0.size, config)
    ws, vs = [], []
    for g in grads:
        theta = adam.step(theta, g)
        ws.append(adam.w)
        vs.append(adam.v)
    return theta, ws, vs

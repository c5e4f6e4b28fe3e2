"""HE-Adam inputs the step tests share: a fresh encrypted state and a unit-norm aggregate."""

from __future__ import annotations

import numpy as np

from coordinator.he_adam import HEAdamConfig, HEAdamState, initial_optimizer_state
from protos.codec import EncryptedVector, encrypt_vector


def encrypted_state(backend, length: int, seed: int = 0) -> tuple[HEAdamState, EncryptedVector]:
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    rng = np.random.default_rng(seed)
    theta = encrypt_vector(backend, rng.normal(scale=0.1, size=length))
    update = rng.normal(size=length)
    aggregate = encrypt_vector(backend, update / np.linalg.norm(update) * config.update_scale)
    return HEAdamState(theta, **initial_optimizer_state(backend, length)), aggregate


def step_vectors(result) -> list[EncryptedVector]:
    state = result.state
    return [state.theta, state.m, state.z, state.w]

"""Unmasking in the HE-Adam step's workers (benchmarks only) is ``unmask_state`` then the step, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.parallel_keyholder import keyholder_workers, reencrypt_message
from benchmarks.parallel_unmask_step import parallel_unmask_step
from coordinator.chunk_workers import ChunkWorkers
from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    unmask_state,
)
from protos.codec import EncryptedVector, encrypt_vector, from_proto, to_proto


def _state(backend, length: int, seed: int = 0) -> tuple[HEAdamState, EncryptedVector]:
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    rng = np.random.default_rng(seed)
    theta = encrypt_vector(backend, rng.normal(scale=0.1, size=length))
    update = rng.normal(size=length)
    aggregate = encrypt_vector(backend, update / np.linalg.norm(update) * config.update_scale)
    return HEAdamState(theta, **initial_optimizer_state(backend, length)), aggregate


def _vectors(result) -> list[EncryptedVector]:
    state = result.state
    return [state.theta, state.m, state.z, state.w]


@pytest.mark.parametrize("due", [("m", "z", "w"), ("z", "w")])
def test_unmasking_in_the_workers_is_unmask_state_then_the_step(coordinator_backend, holder, due):
    """With every vector refreshed, or only those due (m is kept as it is two rounds in three)."""
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    length = 2 * coordinator_backend.slots + 5
    state, aggregate = _state(coordinator_backend, length, seed=1)
    state = HEAdamState(state.theta, state.m, state.z, state.w, step=4)
    masked, masks = mask_state(coordinator_backend, {name: state.named()[name] for name in due})
    refresher = keyholder_workers(holder, workers=1)
    reply = {name: reencrypt_message(refresher, to_proto(coordinator_backend, vec)) for name, vec in masked.items()}
    fresh = {name: from_proto(coordinator_backend, msg, fresh=True) for name, msg in reply.items()}
    unmasked = HEAdamState(state.theta, **{**state.named(), **unmask_state(coordinator_backend, fresh, masks)}, step=4)
    sequential = he_adam_step(coordinator_backend, unmasked, aggregate, config, poly)
    with ChunkWorkers(coordinator_backend, workers=2) as workers:
        fused = parallel_unmask_step(workers, state, reply, masks, aggregate, config, poly)
    for seq, par in zip(_vectors(sequential), _vectors(fused)):
        assert [c.serialize() for c in par.chunks] == [c.serialize() for c in seq.chunks]
    assert fused.state.step == 5

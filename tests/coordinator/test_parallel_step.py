"""The HE-Adam step over worker processes gives the same ciphertexts as the in-process step."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    unmask_state,
)
from coordinator.parallel_step import parallel_he_adam_step, parallel_unmask_step
from participant.keyholder import decrypt_vector
from participant.parallel_keyholder import keyholder_workers, reencrypt_message
from protos.chunk_workers import ChunkWorkers
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
    return [state.theta, state.m, state.v, state.w]


def test_parallel_step_is_the_sequential_step_byte_for_byte(coordinator_backend, holder):
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    length = 2 * coordinator_backend.slots + 5  # three chunks, the last one short
    state, aggregate = _state(coordinator_backend, length)
    sequential = he_adam_step(coordinator_backend, state, aggregate, config, poly)
    with ChunkWorkers(coordinator_backend, workers=2) as workers:
        parallel = parallel_he_adam_step(workers, state, aggregate, config, poly)
        assert workers._pool is not None  # it really ran in processes
    for seq, par in zip(_vectors(sequential), _vectors(parallel)):
        assert par.length == seq.length and len(par.chunks) == 3
        assert [c.serialize() for c in par.chunks] == [c.serialize() for c in seq.chunks]
    np.testing.assert_allclose(
        decrypt_vector(holder, parallel.state.theta), decrypt_vector(holder, sequential.state.theta), atol=1e-9
    )
    assert parallel.state.step == sequential.state.step == 1


def test_one_chunk_or_one_worker_stays_in_process(coordinator_backend, holder):
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    state, aggregate = _state(coordinator_backend, 835)  # CartPole's size
    workers = ChunkWorkers(coordinator_backend, workers=2)
    parallel_he_adam_step(workers, state, aggregate, config, poly)
    assert workers._pool is None
    assert not ChunkWorkers(coordinator_backend, workers=1).parallel


@pytest.mark.parametrize("due", [("m", "v", "w"), ("v", "w")])
def test_unmasking_in_the_workers_is_unmask_state_then_the_step(coordinator_backend, holder, due):
    """With every vector refreshed, or only those due (m is kept as it is two rounds in three)."""
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    length = 2 * coordinator_backend.slots + 5
    state, aggregate = _state(coordinator_backend, length, seed=1)
    state = HEAdamState(state.theta, state.m, state.v, state.w, step=4)
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

"""The HE-Adam step over worker processes gives the same ciphertexts as the in-process step."""

from __future__ import annotations

import numpy as np
import pytest
from support.he_adam_states import encrypted_state, step_vectors

from coordinator.chunk_workers import WORKERS_ENV, ChunkWorkers, default_workers
from coordinator.he_adam import HEAdamConfig, he_adam_step
from coordinator.parallel_step import parallel_he_adam_step
from participant.keyholder import decrypt_vector


def test_parallel_step_is_the_sequential_step_byte_for_byte(coordinator_backend, holder):
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    length = 2 * coordinator_backend.slots + 5  # three chunks, the last one short
    state, aggregate = encrypted_state(coordinator_backend, length)
    sequential = he_adam_step(coordinator_backend, state, aggregate, config, poly)
    with ChunkWorkers(coordinator_backend, workers=2) as workers:
        parallel = parallel_he_adam_step(workers, state, aggregate, config, poly)
        assert workers._pool is not None  # it really ran in processes
    for seq, par in zip(step_vectors(sequential), step_vectors(parallel)):
        assert par.length == seq.length and len(par.chunks) == 3
        assert [c.serialize() for c in par.chunks] == [c.serialize() for c in seq.chunks]
    np.testing.assert_allclose(
        decrypt_vector(holder, parallel.state.theta), decrypt_vector(holder, sequential.state.theta), atol=1e-9
    )
    assert parallel.state.step == sequential.state.step == 1


def test_one_chunk_or_one_worker_stays_in_process(coordinator_backend, holder):
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    state, aggregate = encrypted_state(coordinator_backend, 835)  # CartPole's size
    workers = ChunkWorkers(coordinator_backend, workers=2)
    parallel_he_adam_step(workers, state, aggregate, config, poly)
    assert workers._pool is None
    assert not ChunkWorkers(coordinator_backend, workers=1).parallel


def test_worker_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert default_workers() == 3
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=WORKERS_ENV):
        default_workers()
    monkeypatch.delenv(WORKERS_ENV)
    assert default_workers() >= 1

"""Unmasking in the HE-Adam step's workers (benchmarks only) is ``unmask_state`` then the step, byte for byte."""

from __future__ import annotations

import pytest
from support.he_adam_states import encrypted_state, step_vectors

from benchmarks.parallel_keyholder import keyholder_workers, reencrypt_message
from benchmarks.parallel_unmask_step import parallel_unmask_step
from coordinator.chunk_workers import ChunkWorkers
from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    he_adam_step,
    mask_state,
    unmask_state,
)
from protos.codec import from_proto, to_proto


@pytest.mark.parametrize("due", [("m", "z", "w"), ("z", "w")])
def test_unmasking_in_the_workers_is_unmask_state_then_the_step(coordinator_backend, holder, due):
    """With every vector refreshed, or only those due (m is kept as it is two rounds in three)."""
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    length = 2 * coordinator_backend.slots + 5
    state, aggregate = encrypted_state(coordinator_backend, length, seed=1)
    state = HEAdamState(state.theta, state.m, state.z, state.w, step=4)
    masked, masks = mask_state(coordinator_backend, {name: state.named()[name] for name in due})
    refresher = keyholder_workers(holder, workers=1)
    reply = {name: reencrypt_message(refresher, to_proto(coordinator_backend, vec)) for name, vec in masked.items()}
    fresh = {name: from_proto(coordinator_backend, msg, fresh=True) for name, msg in reply.items()}
    unmasked = HEAdamState(state.theta, **{**state.named(), **unmask_state(coordinator_backend, fresh, masks)}, step=4)
    sequential = he_adam_step(coordinator_backend, unmasked, aggregate, config, poly)
    with ChunkWorkers(coordinator_backend, workers=2) as workers:
        fused = parallel_unmask_step(workers, state, reply, masks, aggregate, config, poly)
    for seq, par in zip(step_vectors(sequential), step_vectors(fused)):
        assert [c.serialize() for c in par.chunks] == [c.serialize() for c in seq.chunks]
    assert fused.state.step == 5

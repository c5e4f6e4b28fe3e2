"""The refresher's state unmasked inside the HE-Adam step's worker processes (benchmarks only).

A variant of ``coordinator.parallel_step.parallel_he_adam_step`` the coordinator does not run
(it unmasks with ``coordinator.he_adam.unmask_state`` in its own process): it takes the
refresher's still-masked state as the wire message it came in, so its chunks go to the workers
as the bytes they already are, and each worker removes the masks itself (``unmask_state`` and
``he_adam_step`` in one pass). ``fedhe bench he-adam --workers N`` and ``fedhe bench scale``
measure what that saves.

It returns the same ciphertexts, byte for byte, as ``unmask_state`` followed by ``he_adam_step``:
serialization is lossless and every operation is deterministic.
"""

from __future__ import annotations

import numpy as np

from coordinator.chunk_workers import ChunkWorkers
from coordinator.he_adam import HEAdamState, Masks, StepResult, assemble_step, step_chunk
from protos.backend import Chunk, HEBackend
from protos.codec import EncryptedVector, check_header, pad_to_chunks
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import STATE_NAMES, HEAdamConfig, InverseSqrtPolynomial


def parallel_unmask_step(
    workers: ChunkWorkers,
    state: HEAdamState,
    masked: dict[str, wire_pb2.EncryptedVector],
    masks: Masks,
    aggregate: EncryptedVector,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> StepResult:
    """``he_adam_step`` on ``state`` with the refresher's vectors unmasked, straight from its wire vectors.

    ``masked``: the reply's ``state`` map, the vectors that were due (fresh, still masked; each chunk
    is checked again as a fresh ciphertext where it is loaded); the rest of ``state`` is used as it is.
    """
    backend = workers.backend
    if set(masked) != set(masks.values) or not set(masked) <= set(STATE_NAMES):
        raise ValueError(f"refreshed state {sorted(masked)} does not match the masks {sorted(masks.values)}")
    slots, length = backend.slots, aggregate.length
    for msg in masked.values():
        check_header(backend, msg, expected_length=length)
    minus = {name: pad_to_chunks(-masks.values[name], slots) for name in masked}
    kept = state.named()

    def item(name: str, i: int) -> tuple:
        if name in masked:
            return masked[name].chunks[i], minus[name][i * slots : (i + 1) * slots]
        return kept[name].chunks[i], None

    groups = [(*(part for name in STATE_NAMES for part in item(name, i)), u) for i, u in enumerate(aggregate.chunks)]
    parts = workers.map(unmask_step_chunk, groups, config, poly, not workers.parallel)
    return assemble_step(backend, state, parts, length)


def unmask_step_chunk(
    backend: HEBackend,
    m: bytes | Chunk,
    m_minus: np.ndarray | None,
    z: bytes | Chunk,
    z_minus: np.ndarray | None,
    w: bytes | Chunk,
    w_minus: np.ndarray | None,
    u: Chunk,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
    with_x: bool,
) -> tuple[Chunk | None, ...]:
    """One chunk: load each refreshed, masked vector and add its minus-mask (as ``unmask_state``), step."""

    def unmasked(item: bytes | Chunk, minus: np.ndarray | None) -> Chunk:
        if minus is None:  # not due: the kept chunk as it is
            return item
        return backend.add_plain(backend.deserialize(item, backend.slots, fresh=True), minus)

    return step_chunk(backend, unmasked(m, m_minus), unmasked(z, z_minus), unmasked(w, w_minus), u, config, poly,
                      with_x)

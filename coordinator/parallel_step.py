"""The HE-Adam step with its chunks spread over worker processes (``protos.chunk_workers``).

Each chunk's step is independent (``he_adam.step_chunk``), so a model of k chunks runs k tasks.
Two things keep the process boundary cheap (a full-depth chunk costs ~10 ms to serialize):

* theta stays in this process: a worker returns ``delta`` and the subtraction, which needs no
  level, happens here;
* ``parallel_unmask_step`` takes the refresher's still-masked state as the wire message it came
  in, so its chunks go to the workers as the bytes they already are, and each worker removes the
  masks itself (``unmask_state`` and ``he_adam_step`` in one pass).

Both return the same ciphertexts, byte for byte, as ``he_adam_step`` (after ``unmask_state``):
serialization is lossless and every operation is deterministic.
"""

from __future__ import annotations

import numpy as np

from coordinator.he_adam import HEAdamState, Masks, StepResult, assemble_step, step_chunk
from protos.backend import Chunk, HEBackend
from protos.chunk_workers import ChunkWorkers
from protos.codec import EncryptedVector, check_header, pad_to_chunks
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import STATE_NAMES, HEAdamConfig, InverseSqrtPolynomial


def parallel_he_adam_step(
    workers: ChunkWorkers,
    state: HEAdamState,
    aggregate: EncryptedVector,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> StepResult:
    """``he_adam_step(workers.backend, ...)`` with one task per chunk; in-process for one chunk."""
    groups = list(zip(state.m.chunks, state.v.chunks, state.w.chunks, aggregate.chunks))
    parts = workers.map(step_chunk, groups, config, poly, not workers.parallel)
    return assemble_step(workers.backend, state, parts, aggregate.length)


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
    v: bytes | Chunk,
    v_minus: np.ndarray | None,
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

    return step_chunk(backend, unmasked(m, m_minus), unmasked(v, v_minus), unmasked(w, w_minus), u, config, poly,
                      with_x)

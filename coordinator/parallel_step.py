"""The HE-Adam step with its chunks spread over worker processes (``coordinator.chunk_workers``).

Each chunk's step is independent (``he_adam.step_chunk``), so a model of k chunks runs k tasks.
theta stays in this process: a worker returns ``delta`` and the subtraction, which needs no
level, happens here (a full-depth chunk costs ~10 ms to serialize across the process boundary).

The result is the same ciphertexts, byte for byte, as ``he_adam_step``: serialization is
lossless and every operation is deterministic.
"""

from __future__ import annotations

from coordinator.chunk_workers import ChunkWorkers
from coordinator.he_adam import HEAdamState, StepResult, assemble_step, step_chunk
from protos.codec import EncryptedVector
from protos.optimizer import HEAdamConfig, InverseSqrtPolynomial


def parallel_he_adam_step(
    workers: ChunkWorkers,
    state: HEAdamState,
    aggregate: EncryptedVector,
    config: HEAdamConfig,
    poly: InverseSqrtPolynomial,
) -> StepResult:
    """``he_adam_step(workers.backend, ...)`` with one task per chunk; in-process for one chunk."""
    groups = list(zip(state.m.chunks, state.z.chunks, state.w.chunks, aggregate.chunks))
    parts = workers.map(step_chunk, groups, config, poly, not workers.parallel)
    return assemble_step(workers.backend, state, parts, aggregate.length)

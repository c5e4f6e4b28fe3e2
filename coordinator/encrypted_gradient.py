"""The policy gradient on encrypted rollouts (encrypted-rollout training, coordinator side).

Owners upload their states and loss-layer deltas as ciphertexts in the slot layout of
``protos.rollout_layout.BlockLayout``; the coordinator holds theta tiled to the same layout
(a key holder re-encrypts it each round). With evaluation keys only (no Galois keys, no
rotations, no secret key) it computes, per block and per network, at multiplicative depth 3:

=====================  ==================================  =======
per-slot quantity      computation                         depth
=====================  ==================================  =======
``z``                  ``sum_j W1_j X_j + b1``             1
``e``                  ``sum_a W2_a D_a``                  1
``q = grad b1``        ``(2z + 1) e``  (2z+1 = z + (z+1))  2
``h``                  ``z (z + 1) = z + z^2``             2
``grad W1_j``          ``X_j q``                           3
``grad W2_a``          ``D_a h``                           3
``grad b2_a``          ``D_a``                             0
=====================  ==================================  =======

That is ``2d + 2A' + 2`` ciphertext products per network (``A'`` outputs: the actor's actions,
the critic's 1) and no scalar products. ``GradientSum`` adds the per-slot results of every block
of every participant. Summing over the transitions inside a ciphertext would need rotations, so a
second exchange does it: the coordinator masks the per-slot sums (``mask_for_collapse``), a key
holder decrypts, applies the public slot-sum map ``BlockLayout.collapse``, rounds and re-encrypts
one dense, fresh vector (``participant.gradient_collapse.collapse_masked``), and the coordinator
removes the collapsed masks (``unmask_collapsed``). The result goes into ``he_adam_step`` with all
of its levels.

TenSEAL mod-switches the *right* operand of ``a + b`` and ``a * b`` in place when it sits at a
higher level than the left one. Every mixed-level operation below therefore puts the
higher-level operand (a fresh upload or tiled theta, which later blocks reuse) on the left.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.he_adam import add_plain_vector
from coordinator.secret_random import secret_uniform
from protos.backend import Chunk, HEBackend
from protos.codec import EncryptedVector
from protos.errors import ChunkLayoutError
from protos.optimizer import MASK_BOUND
from protos.rollout_layout import NETWORKS, BlockLayout

GRADIENT_DEPTH = 3  # multiplicative depth of block_gradient


def block_gradient(
    backend: HEBackend, theta_tiled: Sequence[Chunk], block: Sequence[Chunk], layout: BlockLayout
) -> list[Chunk]:
    """Per-slot gradient ciphertexts of one block, in ``layout.gradient_names`` order.

    ``theta_tiled``: ``layout.theta_vectors`` chunks (``BlockLayout.pack_theta``, encrypted);
    ``block``: ``layout.block_vectors`` chunks (``BlockLayout.pack_block``, encrypted). Neither is
    modified. Uses ciphertext products, additions and scalar additions only, at depth 3.
    """
    if len(theta_tiled) != layout.theta_vectors:
        raise ChunkLayoutError(f"tiled theta has {len(theta_tiled)} chunks, layout needs {layout.theta_vectors}")
    if len(block) != layout.block_vectors:
        raise ChunkLayoutError(f"block has {len(block)} chunks, layout needs {layout.block_vectors}")
    d, a_count = layout.obs_dim, layout.num_outputs
    xs = list(block[:d])
    deltas = {"actor": list(block[d : d + a_count]), "critic": [block[d + a_count]]}
    out: list[Chunk] = []
    pos = 0
    for net in NETWORKS:
        outputs = layout.outputs_of(net)
        w1 = theta_tiled[pos : pos + d]
        b1 = theta_tiled[pos + d]
        w2 = theta_tiled[pos + d + 1 : pos + d + 1 + outputs]
        pos += d + 1 + outputs
        out += _network_gradient(backend, xs, w1, b1, w2, deltas[net])
    return out


def _network_gradient(
    backend: HEBackend,
    xs: list[Chunk],
    w1: Sequence[Chunk],
    b1: Chunk,
    w2: Sequence[Chunk],
    deltas: list[Chunk],
) -> list[Chunk]:
    z = _sum(backend, [backend.mul(w, x) for w, x in zip(w1, xs)])  # depth 1
    z = backend.add(b1, z)  # b1 is fresh: keep it on the left
    e = _sum(backend, [backend.mul(w, dlt) for w, dlt in zip(w2, deltas)])  # depth 1
    z_plus_1 = backend.add_scalar(z, 1.0)
    q = backend.mul(backend.add(z, z_plus_1), e)  # (2z + 1) e, depth 2
    h = backend.mul(z, z_plus_1)  # z + z^2, depth 2
    grad_w1 = [backend.mul(x, q) for x in xs]  # x fresh, on the left; depth 3
    grad_w2 = [backend.mul(dlt, h) for dlt in deltas]  # delta fresh, on the left; depth 3
    return [*grad_w1, q, *grad_w2, *deltas]


def _sum(backend: HEBackend, chunks: list[Chunk]) -> Chunk:
    total = chunks[0]
    for c in chunks[1:]:
        total = backend.add(total, c)
    return total


class GradientSum:
    """Streaming sum of per-slot gradients over blocks and participants.

    Holds one set of ``layout.gradient_vectors`` ciphertexts however many blocks are added.
    """

    def __init__(self, backend: HEBackend, layout: BlockLayout) -> None:
        self.backend, self.layout = backend, layout
        self.blocks = 0
        self._total: list[Chunk] | None = None

    def add(self, per_slot: Sequence[Chunk]) -> None:
        """Add one block's ``block_gradient`` output."""
        if len(per_slot) != self.layout.gradient_vectors:
            raise ChunkLayoutError(
                f"{len(per_slot)} per-slot gradients, layout needs {self.layout.gradient_vectors}"
            )
        if self._total is None:
            self._total = list(per_slot)
        else:
            self._total = [self.backend.add(t, g) for t, g in zip(self._total, per_slot)]
        self.blocks += 1

    def add_block(self, theta_tiled: Sequence[Chunk], block: Sequence[Chunk]) -> None:
        """``block_gradient`` of one uploaded block, added to the sum."""
        self.add(block_gradient(self.backend, theta_tiled, block, self.layout))

    def result(self) -> list[Chunk]:
        """The summed per-slot gradients (``layout.gradient_names`` order)."""
        if self._total is None:
            raise ValueError("no block was added")
        return list(self._total)


def mask_for_collapse(
    backend: HEBackend, per_slot: Sequence[Chunk]
) -> tuple[list[EncryptedVector], list[np.ndarray]]:
    """Add fresh secret uniform masks in ``[-MASK_BOUND, MASK_BOUND]`` to every slot.

    Returns the masked ciphertexts (one single-chunk ``EncryptedVector`` of ``backend.slots``
    values each, ready for ``protos.codec``) for the key holder, and the masks, which the
    coordinator keeps. The masks come from OS entropy (``coordinator.secret_random``), never a seed.
    """
    slots = backend.slots
    masked, masks = [], []
    for chunk in per_slot:
        mask = secret_uniform(-MASK_BOUND, MASK_BOUND, slots)
        masks.append(mask)
        masked.append(EncryptedVector([backend.add_plain(chunk, mask)], slots))
    return masked, masks


def unmask_collapsed(
    backend: HEBackend, dense: EncryptedVector, masks: Sequence[np.ndarray], layout: BlockLayout
) -> EncryptedVector:
    """Subtract the collapsed masks ``layout.collapse(masks)`` from the key holder's fresh dense vector.

    The result is the flat gradient (``layout.num_params`` values), at the level the key holder
    encrypted it (full depth).
    """
    if dense.length != layout.num_params:
        raise ChunkLayoutError(f"collapsed gradient has {dense.length} values, layout has {layout.num_params}")
    if len(masks) != layout.gradient_vectors:
        raise ValueError(f"{len(masks)} masks, layout needs {layout.gradient_vectors}")
    return add_plain_vector(backend, dense, -layout.collapse(list(masks)))


def levels_used(backend: HEBackend, per_slot: Sequence[Chunk]) -> int:
    """Levels the gradient consumed, from fresh: ``profile.levels - min(levels_left)``."""
    return backend.profile.levels - min(backend.levels_left(c) for c in per_slot)


__all__ = [
    "GRADIENT_DEPTH",
    "GradientSum",
    "block_gradient",
    "levels_used",
    "mask_for_collapse",
    "unmask_collapsed",
]


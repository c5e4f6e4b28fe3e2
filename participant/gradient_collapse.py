"""Key-holder side of encrypted-rollout training: collapse masked per-slot gradients.

The coordinator computes per-slot gradients on encrypted rollouts (``coordinator/encrypted_gradient.py``) but
cannot sum the slots of a ciphertext (no rotations, no Galois keys). It sends one key holder
the summed per-slot gradient ciphertexts, each under a fresh uniform mask in
``[-MASK_BOUND, MASK_BOUND]`` per slot. The key holder

1. checks that it got exactly ``layout.gradient_vectors`` single-chunk vectors of ``slots`` values
   and that they decrypt to visibly masked values (else ``RequestRefusedError``),
2. decrypts and applies the public slot-sum map ``layout.collapse``,
3. rounds to a fixed grid (``COLLAPSE_GRID``) and
4. re-encrypts the ``num_params`` values as one fresh, full-depth flat vector.

It never sees an unmasked per-slot value or sum: what it decrypts is ``per-slot gradient + mask``
and what it returns is ``collapsed gradient + collapsed mask``, encrypted; the coordinator removes
the collapsed masks.

Why round: an exact CKKS decryption carries the decryption error, a function of the secret key
(Li and Micciancio, Eurocrypt 2021), and whatever the key holder re-encrypts here flows into theta,
which participants decrypt and a run finally releases. So the key holder rounds the collapsed
(still masked) values to a fixed absolute grid, ``COLLAPSE_GRID = 2^-24`` (6e-8) by default, and
re-encrypts only the rounded values. The key-dependent part of the error is far below the grid: at
a run's ``delta_scale`` (4096 for 3 owners x 2048 transitions) two encryptions of the same rollouts
give collapsed values that differ by a standard deviation of about 3e-10 (maximum about 2e-9 over
the coordinates; ``tests/coordinator/test_encrypted_gradient.py`` checks both with a 4x margin).
Since the secret mask sums place the grid at a uniformly random
offset, a rounded coordinate depends on that error only with probability about ``2 |err| / grid``,
about 1% of the coordinates (2^-30 would give most of them). Rounding is not noise
flooding: it makes the leak rare, it does not prove it away. The grid's own error (at most half a
grid step, 3e-8) is negligible against HE-Adam's input ``u = s G`` with ``|u| <= sqrt(B - 1)``
and against CKKS's deterministic rescaling error (about 1e-5 relative).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from participant.keyholder import KeyHolder, decrypt_vector
from protos.backend import Chunk
from protos.codec import EncryptedVector, encrypt_to_proto
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND
from protos.rollout_layout import BlockLayout

COLLAPSE_GRID = 2.0**-24
# Every used slot carries a uniform mask in +-MASK_BOUND, whose median magnitude is MASK_BOUND/2;
# a median below a quarter of it over thousands of slots means the request is not masked.
MASKED_MIN_MEDIAN = MASK_BOUND / 4


def collapse_masked(
    holder: KeyHolder,
    masked: Sequence[EncryptedVector | Chunk],
    layout: BlockLayout,
    grid: float = COLLAPSE_GRID,
) -> wire_pb2.EncryptedVector:
    """Decrypt the masked per-slot gradients, collapse, round to ``grid``, re-encrypt fresh for the wire.

    ``masked``: ``layout.gradient_vectors`` items, each an ``EncryptedVector`` of one chunk holding
    ``holder.slots`` values, or a bare chunk. Returns ``layout.num_params`` values, encrypted at
    full depth. Raises ``RequestRefusedError`` on a wrong count or size, on a layout that does not
    fit this key's slots, or on inputs that are not masked.
    """
    if not grid > 0:
        raise ValueError("grid must be positive")
    if layout.slots != holder.slots:
        raise RequestRefusedError(f"layout is for {layout.slots} slots, this key has {holder.slots}")
    if len(masked) != layout.gradient_vectors:
        raise RequestRefusedError(
            f"collapse request carries {len(masked)} ciphertexts, the layout defines {layout.gradient_vectors}"
        )
    per_slot = [_decrypt_one(holder, item, n) for n, item in enumerate(masked)]
    for n, values in enumerate(per_slot):
        median = float(np.median(np.abs(values[: layout.used_slots])))
        if median < MASKED_MIN_MEDIAN:
            raise RequestRefusedError(
                f"collapse ciphertext {n} decrypts to values of median magnitude {median:.3g}, not masked "
                f"(the protocol's masks reach {MASK_BOUND:g}); refusing to re-encrypt its sums"
            )
    collapsed = layout.collapse(per_slot)
    return encrypt_to_proto(holder, np.round(collapsed / grid) * grid)


def _decrypt_one(holder: KeyHolder, item: EncryptedVector | Chunk, n: int) -> np.ndarray:
    vector = item if isinstance(item, EncryptedVector) else EncryptedVector([item], holder.slots)
    if len(vector.chunks) != 1 or vector.length != holder.slots:
        raise RequestRefusedError(
            f"collapse ciphertext {n} has {len(vector.chunks)} chunks and {vector.length} values; "
            f"expected one chunk of {holder.slots}"
        )
    values = decrypt_vector(holder, vector)
    if values.size != holder.slots:
        raise RequestRefusedError(f"collapse ciphertext {n} holds {values.size} values, expected {holder.slots}")
    return values


__all__ = ["COLLAPSE_GRID", "MASKED_MIN_MEDIAN", "collapse_masked"]

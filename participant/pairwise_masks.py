"""Double masks: what a participant adds to its update so that only the federation's sum is readable.

All participants hold the same CKKS secret key, so a coordinator colluding with one of them could
decrypt every individual update. Masks close that gap (secure aggregation, Bonawitz et al., CCS
2017), under the ciphertexts. In round ``t`` the coordinator names the round's masking set
(``members``, roster indices); participant ``i`` encrypts ``u_i + b_i + mask_i`` where

    mask_i = sum over members j != i of sign(i, j) * p_ij(t),   sign = +1 if i < j else -1

* ``p_ij(t)`` is a pseudorandom vector that ``i`` and ``j`` both derive and nobody else can: X25519
  key agreement between ``i``'s private key and ``j``'s roster key (``participant.roster``),
  HKDF-SHA256 whose info binds the federation fingerprint, the Flower run id, the round, the pair's
  indices and keys and the stream (update or statistics), and a ChaCha20 keystream. Every pair
  enters the sum once with each sign, so these cancel.
* ``b_i`` is a self-mask from a seed ``i`` draws fresh from OS entropy each round
  (``protos.masking``). ``i`` splits the seed into Shamir shares (pycryptodome), one per other
  member, ``threshold`` of which rebuild it, and seals each share for its recipient (AES-256-GCM
  under a key from the pair's X25519 secret). The coordinator forwards the sealed shares; after
  the round it asks each survivor to open the shares of the other survivors' seeds and subtracts
  the rebuilt self-masks.

Why both (``participant.answer_rules``): a coordinator that claims a live member ``k`` dropped
gets the survivors' corrections of their pair masks with ``k``, but then no survivor opens a share
of ``k``'s seed, so ``k``'s update stays hidden under ``b_k``; a survivor never does both for one
member, and fewer than ``threshold`` colluding members cannot rebuild ``b_k`` on their own.

Exactness and hiding (``protos.masking``): values are rounded to the mask grid and every mask is
an integer on it, so masks cancel or are subtracted without error and the sum's only error is
CKKS's own. Per coordinate one pair mask with an honest peer is uniform over ``[-R, R)``, so the
masked views of two inputs ``a``, ``a'`` are within statistical distance ``|a - a'| / (2R)``;
``R`` is 2^16 for updates (below 1e-5 per coordinate with the defaults) and 2^32 for statistics.

A round's masks must never hide two different values: a participant masks one update per run and
round (``participant.answer_rules``), and a resumed or repeated run has a new run id.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from participant.roster import Roster, RosterError, load_own_key, load_roster
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.masking import (
    SEED_BYTES,
    MaskStream,
    SelfMaskContext,
    default_threshold,
    keystream_integers,
    mask_bits,
    mask_grid,
    self_mask_integers,
)

PAIR_INFO = b"fedhe-rl pairwise mask v1"
SHARE_INFO = b"fedhe-rl self-mask share v1"


@dataclass
class RoundMasks:
    """One participant's masks in one round of one run, over the round's masking set."""

    masker: PairwiseMasker
    run_id: int
    round: int
    members: tuple[int, ...]
    threshold: int
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES), repr=False)

    @property
    def context(self) -> SelfMaskContext:
        return SelfMaskContext(self.masker.roster.fingerprint, self.run_id, self.round, self.masker.index)

    def mask(self, values: np.ndarray, stream: MaskStream) -> np.ndarray:
        """``values`` on the mask grid plus the pair masks and the self-mask: exact in float64."""
        grid = mask_grid(stream, self.masker.size)
        steps = np.round(np.asarray(values, dtype=np.float64) / grid)
        peers = [j for j in self.members if j != self.masker.index]
        masks = self.masker.pair_mask(peers, self.run_id, self.round, stream, steps.size)
        masks += self_mask_integers(self.seed, self.context, stream, steps.size, self.masker.size)
        return (steps + masks.astype(np.float64)) * grid

    def correction(self, dropped: list[int], stream: MaskStream, length: int) -> np.ndarray:
        """Minus this participant's pair masks with ``dropped``: added to the sum, they cancel."""
        pairs = self.masker.pair_mask(dropped, self.run_id, self.round, stream, length)
        return -pairs.astype(np.float64) * mask_grid(stream, self.masker.size)

    def metadata(self) -> wire_pb2.PairwiseMasking:
        """Public masking metadata plus one sealed share of the seed per other member."""
        others = [j for j in self.members if j != self.masker.index]
        shares = Shamir.split(self.threshold, len(others), self.seed)
        return wire_pb2.PairwiseMasking(
            participant_index=self.masker.index,
            roster_size=self.masker.size,
            members=list(self.members),
            threshold=self.threshold,
            commitment=self.context.commitment(self.seed),
            shares=[self.masker.seal_share(j, x, share, self.run_id, self.round)
                    for j, (x, share) in zip(others, shares)],
        )


class PairwiseMasker:
    """Participant ``index``'s masks for every round, from its private key and the roster."""

    def __init__(self, roster: Roster, index: int, private_key: X25519PrivateKey) -> None:
        roster.public_key(index)  # on the roster, or a RosterError
        self.roster, self.index = roster, index
        self._private = private_key
        self._shared: dict[int, bytes] = {}

    @classmethod
    def load(cls, key_dir: Path, index: int, fingerprint: str) -> PairwiseMasker:
        roster = load_roster(key_dir, fingerprint)
        return cls(roster, index, load_own_key(key_dir, index, roster))

    @property
    def size(self) -> int:
        return self.roster.size

    def round(self, run_id: int, round_: int, members: list[int] | tuple[int, ...], threshold: int = 0) -> RoundMasks:
        """This round's masks over ``members``; ``threshold`` 0: ``protos.masking.default_threshold``."""
        members = tuple(sorted(int(m) for m in members))
        if self.index not in members:
            raise RosterError(f"participant {self.index} is not in the round's masking set {list(members)}")
        for j in members:
            self.roster.public_key(j)  # on the roster, or a RosterError
        threshold = threshold or default_threshold(len(members))
        if not 2 <= threshold <= len(members) - 1:
            raise RequestRefusedError(
                f"a self-mask threshold of {threshold} needs at least {threshold + 1} members, the round has "
                f"{len(members)}"
            )
        return RoundMasks(self, int(run_id), int(round_), members, threshold)

    # -- the pair masks -----------------------------------------------------------------------------
    def pair_mask(self, peers: list[int], run_id: int, round_: int, stream: MaskStream, length: int) -> np.ndarray:
        """sum over ``peers`` of sign(i, j) p_ij, as integers on the grid."""
        total = np.zeros(length, dtype=np.int64)
        for j in peers:
            if j == self.index:
                raise RosterError(f"participant {self.index} has no mask with itself")
            pair = keystream_integers(self._pair_key(j, run_id, round_, stream), length, mask_bits(self.size))
            total += pair if self.index < j else -pair
        return total

    def _shared_secret(self, peer: int) -> bytes:
        if peer not in self._shared:
            self._shared[peer] = self._private.exchange(self.roster.public_key(peer))
        return self._shared[peer]

    def _pair_key(self, peer: int, run_id: int, round_: int, stream: MaskStream) -> bytes:
        lo, hi = sorted((self.index, peer))
        info = b"".join([
            PAIR_INFO, b"\0", self.roster.fingerprint.encode(), b"\0", struct.pack(">QQII", run_id, round_, lo, hi),
            self.roster.public_keys[lo], self.roster.public_keys[hi], stream.name.encode(),
        ])
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._shared_secret(peer))

    # -- sealed shares of self-mask seeds ----------------------------------------------------------
    def _share_key(self, sender: int, recipient: int, run_id: int, round_: int) -> tuple[AESGCM, bytes]:
        """The AEAD key only ``sender`` and ``recipient`` derive, and the context it authenticates."""
        other = recipient if sender == self.index else sender
        context = b"".join([SHARE_INFO, b"\0", self.roster.fingerprint.encode(), b"\0",
                            struct.pack(">QQII", run_id, round_, sender, recipient)])
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(self._shared_secret(other))
        return AESGCM(key), context

    def seal_share(self, recipient: int, x: int, share: bytes, run_id: int, round_: int) -> wire_pb2.SealedShare:
        aead, context = self._share_key(self.index, recipient, run_id, round_)
        nonce = os.urandom(12)
        plain = struct.pack(">H", x) + share
        return wire_pb2.SealedShare(sender=self.index, recipient=recipient, nonce=nonce,
                                    ciphertext=aead.encrypt(nonce, plain, context))

    def open_share(self, sealed: wire_pb2.SealedShare, run_id: int, round_: int) -> wire_pb2.RevealedShare:
        """A share of ``sealed.sender``'s seed addressed to this participant, opened for the coordinator."""
        if sealed.recipient != self.index or sealed.sender == self.index:
            raise RequestRefusedError(f"share from {sealed.sender} to {sealed.recipient} is not this participant's")
        aead, context = self._share_key(sealed.sender, self.index, run_id, round_)
        try:
            plain = aead.decrypt(bytes(sealed.nonce), bytes(sealed.ciphertext), context)
        except (InvalidTag, ValueError):
            raise RequestRefusedError(
                f"the share from participant {sealed.sender} does not open for round {round_} (altered or replayed)"
            ) from None
        if len(plain) != 2 + SEED_BYTES:
            raise RequestRefusedError(f"the share from participant {sealed.sender} has the wrong length")
        (x,) = struct.unpack(">H", plain[:2])
        return wire_pb2.RevealedShare(sender=sealed.sender, x=x, share=plain[2:])

"""Pairwise masks: what a participant adds to its update so that only the federation's sum is readable.

All participants hold the same CKKS secret key, so a coordinator colluding with one of them could
decrypt every individual update. Masks close that gap (secure aggregation, Bonawitz et al., CCS
2017), under the ciphertexts: participant ``i`` encrypts ``u_i + mask_i`` where

    mask_i = sum over roster members j != i of sign(i, j) * p_ij(t),   sign = +1 if i < j else -1

and ``p_ij(t)`` is a pseudorandom vector that ``i`` and ``j`` both derive, and nobody else can, for
round ``t``: X25519 key agreement between ``i``'s private key and ``j``'s roster key
(``participant.roster``), HKDF-SHA256 whose info binds the federation fingerprint, the Flower run
id and the round, the pair's indices and keys and the stream (update or statistics), and a ChaCha20
keystream (all from ``cryptography``). Every pair enters the sum once with each sign, so the masks
cancel. A round's masks must never hide two different values: a participant masks one update per
run and round (``participant.answer_rules``), and a resumed or repeated run has a new run id.

Exact cancellation: a pair's mask is an integer uniform in ``[-2^(b-1), 2^(b-1))`` times a grid
``g = R / 2^(b-1)`` (``R`` the stream's mask bound), with ``b`` chosen so that a participant's sum of
``size - 1`` pair masks stays below 2^53. Participants round their values to the same grid before
adding the mask, so ``u + mask`` is exact in float64 and carries no digit below the grid; masks
then cancel exactly and the sum's only error is CKKS's own (``fedhe bench masking``: sum_abs_err).

Hiding: per coordinate, one pair mask with an honest peer is uniform over 2^b grid points spanning
``[-R, R)`` and independent of everything else in the view, so the masked values of two possible
inputs ``a`` and ``a'`` are within statistical distance ``|a - a'| / (2R)`` (adding further
independent masks cannot increase it). ``R`` is 2^16 for updates (|coordinate| <= C s / n, about
0.6 with the defaults: distance below 1e-5 per coordinate) and 2^32 for the rollout statistics.
Masked values reach ``(size - 1) R`` at full depth, where a fresh ciphertext has hundreds of bits of
headroom; only the unmasked sum enters HE-Adam.

Masks are over the whole roster, whoever takes part in a round: for roster members whose update
the coordinator did not take, each participant that answered sends ``correction`` (minus its
pair masks with them), encrypted (``participant.node``, ``query.unmask``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from participant.roster import Roster, RosterError, load_own_key, load_roster

INFO = b"fedhe-rl pairwise mask v1"
FLOAT_BITS = 53  # integers up to 2^53 are exact in float64


@dataclass(frozen=True)
class MaskStream:
    name: str
    bound: float  # R: each pair's mask is uniform in [-R, R) per value


UPDATE_STREAM = MaskStream("update", 2.0**16)
STATS_STREAM = MaskStream("stats", 2.0**32)


def pair_bits(roster_size: int) -> int:
    """b: bits of one pair mask, so that ``roster_size - 1`` of them sum exactly below 2^53."""
    return FLOAT_BITS - (max(roster_size - 1, 1) - 1).bit_length()


def mask_grid(stream: MaskStream, roster_size: int) -> float:
    """g: the value of one integer step of a mask (a power of two)."""
    return stream.bound / 2.0 ** (pair_bits(roster_size) - 1)


def hiding_bound(stream: MaskStream, value_bound: float) -> float:
    """Statistical distance, per coordinate, between the masked views of two values within +-value_bound."""
    return value_bound / stream.bound


@dataclass(frozen=True)
class RoundMasks:
    """One participant's masks in one round of one run."""

    masker: PairwiseMasker
    run_id: int
    round: int

    def mask(self, values: np.ndarray, stream: MaskStream) -> np.ndarray:
        """``values`` on the mask grid plus this participant's mask: exact in float64."""
        return self.masker.mask(values, self.run_id, self.round, stream)

    def correction(self, dropped: list[int], stream: MaskStream, length: int) -> np.ndarray:
        return self.masker.correction(dropped, self.run_id, self.round, stream, length)


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

    def grid(self, stream: MaskStream) -> float:
        return mask_grid(stream, self.size)

    def round(self, run_id: int, round_: int) -> RoundMasks:
        return RoundMasks(self, int(run_id), int(round_))

    def mask(self, values: np.ndarray, run_id: int, round_: int, stream: MaskStream) -> np.ndarray:
        """``values`` on the mask grid plus this participant's mask: exact in float64."""
        grid = self.grid(stream)
        steps = np.round(np.asarray(values, dtype=np.float64) / grid)
        peers = [j for j in range(self.size) if j != self.index]
        return (steps + self._integer_mask(peers, run_id, round_, stream, steps.size).astype(np.float64)) * grid

    def correction(self, dropped: list[int], run_id: int, round_: int, stream: MaskStream, length: int) -> np.ndarray:
        """Minus this participant's pair masks with ``dropped``: added to the sum, they cancel."""
        return -self._integer_mask(dropped, run_id, round_, stream, length).astype(np.float64) * self.grid(stream)

    # -- the pair masks -----------------------------------------------------------------------------
    def _integer_mask(self, peers: list[int], run_id: int, round_: int, stream: MaskStream, length: int) -> np.ndarray:
        total = np.zeros(length, dtype=np.int64)
        for j in peers:
            pair = self._pair_integers(j, run_id, round_, stream, length)
            total += pair if self.index < j else -pair
        return total

    def _pair_integers(self, peer: int, run_id: int, round_: int, stream: MaskStream, length: int) -> np.ndarray:
        """p_ij as integers uniform in [-2^(b-1), 2^(b-1)): the top b bits of 64 keystream bits each."""
        if peer == self.index:
            raise RosterError(f"participant {self.index} has no mask with itself")
        bits = pair_bits(self.size)
        cipher = Cipher(algorithms.ChaCha20(self._pair_key(peer, run_id, round_, stream), bytes(16)), mode=None)
        words = np.frombuffer(cipher.encryptor().update(bytes(8 * length)), dtype="<u8")
        return (words >> np.uint64(64 - bits)).astype(np.int64) - np.int64(2 ** (bits - 1))

    def _pair_key(self, peer: int, run_id: int, round_: int, stream: MaskStream) -> bytes:
        if peer not in self._shared:
            self._shared[peer] = self._private.exchange(self.roster.public_key(peer))
        lo, hi = sorted((self.index, peer))
        info = b"".join([
            INFO, b"\0", self.roster.fingerprint.encode(), b"\0", struct.pack(">QQII", run_id, round_, lo, hi),
            self.roster.public_keys[lo], self.roster.public_keys[hi], stream.name.encode(),
        ])
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._shared[peer])

"""Slot layout of encrypted-rollout training, shared by owners, key holders and the coordinator.

The coordinator computes the policy gradient of the polynomial actor-critic
(``scenarios/poly_net.py``) on ciphertexts without rotations (it holds no Galois keys). So every
ciphertext carries one value per slot ``(i, k) = i * hidden + k``: transition ``i`` of the block
and hidden unit ``k``. A block holds ``transitions_per_block = slots // hidden`` transitions;
slots from ``transitions_per_block * hidden`` on are always zero.

Owner upload, one block (``pack_block``; ``block_vectors = d + A + 1`` vectors)::

    X_j       j < d    X_j[(i, k)] = obs[i, j]                       (repeated over k)
    D_a       a < A    D_a[(i, k)] = delta_scale * d_actor[i, a]
    D_c                D_c[(i, k)] = delta_scale * d_critic[i]

Observations must lie in ``[-1, 1]`` (scale and clip them): the gradient bound that keeps
HE-Adam's interval guarantee (``PolyNetSpec.gradient_bounds``) assumes it, so packing refuses
anything else.

Tiled theta (``pack_theta``; ``theta_vectors = 2d + A + 3`` vectors), actor first, then critic,
each network as::

    W1_j      j < d    W1_j[(i, k)] = W1[k, j]             (repeated over i)
    b1                 b1[(i, k)]   = b1[k]
    W2_a      a < A'   W2_a[(i, k)] = W2[a, k]             (A' = A for the actor, 1 for the critic)

Per-slot gradients the coordinator produces (``collapse`` input;
``gradient_vectors = 2 (d + A + 2)`` vectors), actor first, then critic, each network as::

    gW1_j     j < d    X_j * q                     q = (2z + 1) * sum_a W2_a D_a
    gb1                q
    gW2_a     a < A'   D_a * (z + z^2)             z = sum_j W1_j X_j + b1
    gb2_a     a < A'   D_a

``collapse`` is the public slot-sum map: for every k it sums each vector over the transition
index i and places the sums at their coordinates of the flat theta layout. A ``b2`` gradient is
the same sum for every k; ``collapse`` averages it over k (which also averages CKKS noise). The
map is linear, so masks added per slot collapse to known mask sums.

Zero rows (fewer transitions than a block holds, or whole padding blocks) contribute nothing,
because every gradient term carries a delta factor.

``delta_scale`` (public, the same for everyone; a power of two keeps it exact): ``pack_block``
multiplies the deltas by it and ``collapse`` divides by it. Loss-layer deltas carry a ``1/T``
weight, so per transition they are tiny against the absolute CKKS encryption noise (about 1e-8
per slot at a 40-bit scale); scaling them to O(1) (``suggested_delta_scale``) makes the
gradient's error relative instead of absolute. The per-slot gradients then stay far below the
collapse masks (``MASK_BOUND = 2^15``) that hide them from the key holder.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

NETWORKS = ("actor", "critic")


class BlockLayout:
    """Where every value of a block, of tiled theta and of the per-slot gradients sits.

    ``BlockLayout(spec, slots)`` takes any object with ``obs_dim``, ``hidden`` and ``num_outputs``
    (e.g. ``scenarios.poly_net.PolyNetSpec``; if it also has ``num_params``, that must agree);
    ``BlockLayout.of(obs_dim, hidden, num_outputs, slots)`` takes plain ints.
    """

    def __init__(self, spec: Any, slots: int, delta_scale: float = 1.0) -> None:
        self.obs_dim = int(spec.obs_dim)
        self.hidden = int(spec.hidden)
        self.num_outputs = int(spec.num_outputs)
        self.continuous = bool(getattr(spec, "continuous", False))
        self.slots = int(slots)
        self.delta_scale = float(delta_scale)
        if not (np.isfinite(self.delta_scale) and self.delta_scale > 0):
            raise ValueError(f"delta_scale must be positive, got {delta_scale}")
        if min(self.obs_dim, self.hidden, self.num_outputs) < 1:
            raise ValueError("obs_dim, hidden and num_outputs must be positive")
        if self.hidden > self.slots:
            raise ValueError(f"hidden={self.hidden} does not fit in {self.slots} slots")
        # a continuous actor's log std has no per-slot term: it stays fixed with this upload
        self.offsets, self.num_params = parameter_offsets(spec)

    @classmethod
    def of(cls, obs_dim: int, hidden: int, num_outputs: int, slots: int, delta_scale: float = 1.0) -> BlockLayout:
        return cls(SimpleNamespace(obs_dim=obs_dim, hidden=hidden, num_outputs=num_outputs), slots, delta_scale)

    def __repr__(self) -> str:
        return (
            f"BlockLayout(obs_dim={self.obs_dim}, hidden={self.hidden}, num_outputs={self.num_outputs}, "
            f"slots={self.slots}, delta_scale={self.delta_scale:g})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, int, int, int, float]:
        return (self.obs_dim, self.hidden, self.num_outputs, self.slots, self.delta_scale)

    # ----- sizes ----------------------------------------------------------------------------
    @property
    def transitions_per_block(self) -> int:
        return self.slots // self.hidden

    @property
    def used_slots(self) -> int:
        """Slots that carry transitions; the rest are zero."""
        return self.transitions_per_block * self.hidden

    def outputs_of(self, net: str) -> int:
        return self.num_outputs if net == "actor" else 1

    @property
    def block_vectors(self) -> int:
        """Ciphertexts an owner uploads per block: X_j, D_actor_a, D_critic."""
        return self.obs_dim + self.num_outputs + 1

    @property
    def theta_vectors(self) -> int:
        """Ciphertexts of tiled theta: per network W1_j, b1, W2_a."""
        return sum(self.obs_dim + 1 + self.outputs_of(net) for net in NETWORKS)

    @property
    def gradient_vectors(self) -> int:
        """Per-slot gradient ciphertexts per block (and after summing): per network gW1_j, gb1, gW2_a, gb2_a."""
        return sum(self.obs_dim + 1 + 2 * self.outputs_of(net) for net in NETWORKS)

    def blocks_for(self, transitions: int) -> int:
        """Blocks that hold ``transitions`` transitions (at least one)."""
        if transitions < 0:
            raise ValueError("transitions must be non-negative")
        return max(1, -(-int(transitions) // self.transitions_per_block))

    @property
    def gradient_names(self) -> list[str]:
        """Names of the per-slot gradient vectors in the coordinator's order (for messages and logs)."""
        names = []
        for net in NETWORKS:
            names += [f"{net}_W1_{j}" for j in range(self.obs_dim)] + [f"{net}_b1"]
            names += [f"{net}_W2_{a}" for a in range(self.outputs_of(net))]
            names += [f"{net}_b2_{a}" for a in range(self.outputs_of(net))]
        return names

    # ----- packing --------------------------------------------------------------------------
    def pack_block(self, obs: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray) -> list[np.ndarray]:
        """One block's plaintext vectors ``X_0..X_{d-1}, D_actor_0..D_actor_{A-1}, D_critic``.

        Deltas are given in gradient units and multiplied by ``delta_scale``; at most
        ``transitions_per_block`` transitions; missing ones are zero rows.
        """
        obs, d_actor, d_critic = self._rows(obs, d_actor, d_critic)
        b = obs.shape[0]
        if b > self.transitions_per_block:
            raise ValueError(f"{b} transitions do not fit a block of {self.transitions_per_block}")
        deltas = self.delta_scale * np.concatenate([d_actor, d_critic[:, None]], axis=1)
        columns = np.concatenate([obs, deltas], axis=1)  # (b, d + A + 1)
        out = np.zeros((self.block_vectors, self.slots))
        out[:, : b * self.hidden] = np.repeat(columns.T, self.hidden, axis=1)
        return list(out)

    def pack_blocks(
        self, obs: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray, num_blocks: int | None = None
    ) -> list[list[np.ndarray]]:
        """Split a rollout into blocks, padded with all-zero blocks to ``num_blocks``.

        Pad every upload to a fixed ``num_blocks`` (the same for all owners and rounds), or the
        number of ciphertexts tells the coordinator the transition count.
        """
        obs, d_actor, d_critic = self._rows(obs, d_actor, d_critic)
        needed = self.blocks_for(obs.shape[0])
        num_blocks = needed if num_blocks is None else int(num_blocks)
        if num_blocks < needed:
            raise ValueError(f"{obs.shape[0]} transitions need {needed} blocks, got num_blocks={num_blocks}")
        step = self.transitions_per_block
        return [
            self.pack_block(obs[n * step : (n + 1) * step], d_actor[n * step : (n + 1) * step],
                            d_critic[n * step : (n + 1) * step])
            for n in range(num_blocks)
        ]  # fmt: skip

    def pack_theta(self, theta: np.ndarray) -> list[np.ndarray]:
        """Theta tiled over the transitions: actor ``W1_j, b1, W2_a``, then critic ``W1_j, b1, W2``."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        rows = []
        for net in NETWORKS:
            w1, b1, w2 = self._net_params(theta, net)
            rows += [w1[:, j] for j in range(self.obs_dim)] + [b1] + [w2[a] for a in range(self.outputs_of(net))]
        out = np.zeros((len(rows), self.slots))
        out[:, : self.used_slots] = np.tile(np.stack(rows), (1, self.transitions_per_block))
        return list(out)

    # ----- the slot-sum map -----------------------------------------------------------------
    def collapse(self, per_slot: list[np.ndarray]) -> np.ndarray:
        """Sum every per-slot gradient vector over the transitions, place it in the flat theta layout.

        The result is divided by ``delta_scale``, so it is in gradient units.
        """
        if len(per_slot) != self.gradient_vectors:
            raise ValueError(f"expected {self.gradient_vectors} per-slot vectors, got {len(per_slot)}")
        stacked = np.stack([np.asarray(v, dtype=np.float64) for v in per_slot])
        if stacked.shape[1] < self.used_slots:
            raise ValueError(f"per-slot vectors hold {stacked.shape[1]} values, need {self.used_slots}")
        sums = stacked[:, : self.used_slots].reshape(len(per_slot), self.transitions_per_block, self.hidden)
        sums = sums.sum(axis=1)  # (gradient_vectors, hidden): one sum over i per k
        theta = np.zeros(self.num_params)
        row, d = 0, self.obs_dim
        for net in NETWORKS:
            a = self.outputs_of(net)
            self._put(theta, f"{net}_W1", sums[row : row + d].T)  # (hidden, d), row-major
            self._put(theta, f"{net}_b1", sums[row + d])
            self._put(theta, f"{net}_W2", sums[row + d + 1 : row + d + 1 + a])
            self._put(theta, f"{net}_b2", sums[row + d + 1 + a : row + d + 1 + 2 * a].mean(axis=1))
            row += d + 1 + 2 * a
        return theta / self.delta_scale

    # ----- helpers --------------------------------------------------------------------------
    def _put(self, theta: np.ndarray, name: str, values: np.ndarray) -> None:
        flat = np.ravel(values)
        start = self.offsets[name]
        theta[start : start + flat.size] = flat

    def _net_params(self, theta: np.ndarray, net: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, d, a = self.hidden, self.obs_dim, self.outputs_of(net)
        w1 = theta[self.offsets[f"{net}_W1"] :][: h * d].reshape(h, d)
        b1 = theta[self.offsets[f"{net}_b1"] :][:h]
        w2 = theta[self.offsets[f"{net}_W2"] :][: a * h].reshape(a, h)
        return w1, b1, w2

    def _rows(
        self, obs: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs = np.asarray(obs, dtype=np.float64)
        b = obs.shape[0] if obs.ndim == 2 else -1
        d_actor = np.asarray(d_actor, dtype=np.float64)
        d_critic = np.asarray(d_critic, dtype=np.float64)
        if obs.shape != (b, self.obs_dim) or d_actor.shape != (b, self.num_outputs) or d_critic.shape != (b,):
            raise ValueError(
                f"expected obs (B, {self.obs_dim}), d_actor (B, {self.num_outputs}) and d_critic (B,); got "
                f"{obs.shape}, {d_actor.shape}, {d_critic.shape}"
            )
        if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(d_actor)) and np.all(np.isfinite(d_critic))):
            raise ValueError("observations and deltas must be finite")
        if obs.size and np.max(np.abs(obs)) > 1.0:
            raise ValueError(
                f"observations reach {np.max(np.abs(obs)):.3g}; scale and clip them to [-1, 1] (the gradient bound "
                "behind HE-Adam's interval guarantee assumes it)"
            )
        return obs, d_actor, d_critic


def parameter_offsets(spec: Any) -> tuple[dict[str, int], int]:
    """Where each block of the flat theta starts, and its size, in ``scenarios/poly_net.py``'s order (this
    module cannot import it; the tests check both agree). Refuses a spec that declares another size."""
    d, h, a = int(spec.obs_dim), int(spec.hidden), int(spec.num_outputs)
    sizes = {
        "actor_W1": h * d, "actor_b1": h, "actor_W2": a * h, "actor_b2": a,
        **({"actor_log_std": a} if getattr(spec, "continuous", False) else {}),
        "critic_W1": h * d, "critic_b1": h, "critic_W2": h, "critic_b2": 1,
    }  # fmt: skip
    offsets = np.cumsum([0, *sizes.values()])
    num_params = int(offsets[-1])
    declared = getattr(spec, "num_params", None)
    if declared is not None and int(declared) != num_params:
        raise ValueError(f"spec declares {declared} parameters, the layout has {num_params}")
    return {name: int(off) for name, off in zip(sizes, offsets)}, num_params


def suggested_delta_scale(participants: int, transitions: int, clip_bound: float) -> float:
    """A power of two near ``participants * transitions / clip_bound``.

    Owners that bound their deltas as ``PolyNetSpec.gradient_bounds`` requires (``sum_i |d_i|_1 <=
    C / (n L)``) have per-transition deltas of about ``C / (n T)``; this scale brings them to O(1).
    A single transition that carried a participant's whole budget would reach about ``T`` per slot,
    still below ``MASK_BOUND`` for ``T`` up to a few thousand.
    """
    if min(participants, transitions) < 1 or not clip_bound > 0:
        raise ValueError("participants and transitions must be positive, clip_bound > 0")
    return float(2.0 ** round(np.log2(participants * transitions / clip_bound)))


def layout_for_round(scenario: Any, slots: int, participants: int) -> BlockLayout:
    """The one layout owners, key holders and the coordinator derive from a round's public facts:
    the scenario's polynomial network (``scenario.poly_spec()``), its rollout size and clip bound
    (``scenario.rollout``), the profile's slots and the round's participant count."""
    cfg = scenario.rollout
    scale = suggested_delta_scale(participants, cfg.transitions, cfg.server.clip_bound)
    return BlockLayout(scenario.poly_spec(), slots, scale)


__all__ = ["NETWORKS", "BlockLayout", "layout_for_round", "parameter_offsets", "suggested_delta_scale"]

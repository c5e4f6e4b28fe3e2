"""Sufficient statistics of a rollout: the encrypted-rollout gradient from a few sums per owner.

For the polynomial actor-critic (``scenarios/poly_net.py``: one hidden layer, activation
``a(z) = z + z^2``) and a fixed theta, the gradient of ``sum_i D_i . outputs_i`` is *linear* in
three statistics per network output ``o`` (the actor's outputs, then the critic's value), over the
owner's transitions ``i`` with scaled states ``x_i`` and loss-layer deltas ``D_io``::

    c_o = sum_i D_io          v_o = sum_i D_io x_i          M_o = sum_i D_io x_i x_i^T

With ``z_k = W1_k . x + b1_k`` (per network, ``W1_k`` its hidden unit ``k``'s row)::

    grad b2_o    = c_o
    grad W2_ok   = (1 + 2 b1_k) W1_k . v_o + W1_k M_o W1_k^T + (b1_k + b1_k^2) c_o
    grad W1_kj   = sum_o W2_ok (2 (M_o W1_k^T)_j + (2 b1_k + 1) v_oj)
    grad b1_k    = sum_o W2_ok (2 W1_k . v_o + (2 b1_k + 1) c_o)

So every gradient coordinate is ``sum_s T_ps(theta) S_s``: a sum of *terms*, each a coefficient that
depends on theta alone times one statistic. ``StatisticsLayout`` lists the terms once, in slot
order. An owner uploads its statistics *tiled* (slot ``n`` holds the statistic of term ``n``),
under its pairwise mask: the masks cancel in the federation's sum, as for an update. A key holder,
who knows theta, encrypts the coefficients in the same slots (``pack_theta``). The coordinator
multiplies the two (one ciphertext product, depth 1) and masks the per-term products; a key holder
sums the terms of each coordinate (``collapse``, the public slot-sum map, as for the per-transition
upload) and re-encrypts one dense gradient.

A continuous actor's log standard deviations add one statistic each, the owner's summed
log-std deltas ``sum_i d_log_std_ia``, whose coefficient is 1: the owner computes everything
non-polynomial about the spread on its own values.

``M_o`` is symmetric: only its upper triangle is sent (off-diagonal coefficients doubled). For
CartPole (d = 4, H = 16, 2 actions) that is 45 statistics and 1,923 terms: one ciphertext.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from protos.rollout_layout import parameter_offsets

NETWORKS = ("actor", "critic")
# How a term's second factor is made from theta[i2]: 1, t, 1 + 2t, t + t^2.
_ONE, _SAME, _ONE_PLUS_TWICE, _POLY = range(4)


class StatisticsLayout:
    """Which statistic and which coefficient every slot holds, and the slot-sum map back to theta.

    Takes any object with ``obs_dim``, ``hidden`` and ``num_outputs`` (``PolyNetSpec``). Uses the
    flat parameter order of ``scenarios/poly_net.py``; the tests check both agree.
    """

    def __init__(self, spec: Any, slots: int) -> None:
        self.obs_dim, self.hidden, self.num_outputs = int(spec.obs_dim), int(spec.hidden), int(spec.num_outputs)
        self.continuous = bool(getattr(spec, "continuous", False))
        self.slots = int(slots)
        d, h, a = self.obs_dim, self.hidden, self.num_outputs
        if min(d, h, a, self.slots) < 1:
            raise ValueError("obs_dim, hidden, num_outputs and slots must be positive")
        self.upper = np.triu_indices(d)  # M_o's sent entries, row-major upper triangle
        self.per_output = 1 + d + len(self.upper[0])
        self.spread = a if self.continuous else 0  # summed log-std deltas, after the outputs' statistics
        self.stats_length = (a + 1) * self.per_output + self.spread
        self.offsets, self.num_params = parameter_offsets(spec)
        self._build_terms()
        self.gradient_vectors = -(-self.terms // self.slots)  # ciphertexts of tiled statistics, coefficients, products
        self.theta_vectors = self.gradient_vectors
        self.upload_length = self.gradient_vectors * self.slots
        self.used_slots = min(self.terms, self.slots)  # the collapse checks these are masked

    def __repr__(self) -> str:
        return (f"StatisticsLayout(obs_dim={self.obs_dim}, hidden={self.hidden}, num_outputs={self.num_outputs}, "
                f"slots={self.slots}: {self.stats_length} statistics, {self.terms} terms)")

    # ----- the terms --------------------------------------------------------------------------
    def _build_terms(self) -> None:
        d, h = self.obs_dim, self.hidden
        pair = {}  # (j, i) and (i, j) -> index of M's entry among the sent ones
        for n, (j, i) in enumerate(zip(*self.upper)):
            pair[(j, i)] = pair[(i, j)] = n
        rows: list[tuple[int, int, float, int, int, int]] = []  # param, stat, const, i1, i2, kind

        def term(param: int, stat: int, const: float, i1: int = -1, i2: int = -1, kind: int = _ONE) -> None:
            rows.append((param, stat, const, i1, i2, kind))

        for net in NETWORKS:
            outputs = range(self.num_outputs) if net == "actor" else range(1)
            for a in outputs:
                o = a if net == "actor" else self.num_outputs
                c, v = o * self.per_output, o * self.per_output + 1
                m = v + d
                b2 = self.offsets[f"{net}_b2"] + a
                term(b2, c, 1.0)
                for k in range(h):
                    w2 = self.offsets[f"{net}_W2"] + a * h + k
                    b1 = self.offsets[f"{net}_b1"] + k
                    w1 = [self.offsets[f"{net}_W1"] + k * d + j for j in range(d)]
                    # grad W2_ak
                    term(w2, c, 1.0, -1, b1, _POLY)
                    for j in range(d):
                        term(w2, v + j, 1.0, w1[j], b1, _ONE_PLUS_TWICE)
                    for n, (j, i) in enumerate(zip(*self.upper)):
                        term(w2, m + n, 1.0 if j == i else 2.0, w1[j], w1[i], _SAME)
                    # grad b1_k
                    term(b1, c, 1.0, w2, b1, _ONE_PLUS_TWICE)
                    for j in range(d):
                        term(b1, v + j, 2.0, w2, w1[j], _SAME)
                    # grad W1_kj
                    for j in range(d):
                        term(w1[j], v + j, 1.0, w2, b1, _ONE_PLUS_TWICE)
                        for i in range(d):
                            term(w1[j], m + pair[(j, i)], 2.0, w2, w1[i], _SAME)
        for a in range(self.spread):
            term(self.offsets["actor_log_std"] + a, (self.num_outputs + 1) * self.per_output + a, 1.0)
        table = np.array(rows, dtype=np.float64)
        self.terms = len(rows)
        self.param_of = table[:, 0].astype(np.int64)
        self.stat_of = table[:, 1].astype(np.int64)
        self._const, self._kind = table[:, 2], table[:, 5].astype(np.int64)
        self._i1, self._i2 = table[:, 3].astype(np.int64), table[:, 4].astype(np.int64)

    # ----- owners: statistics ----------------------------------------------------------------
    def statistics(self, obs: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray,
                   d_log_std: np.ndarray | None = None) -> np.ndarray:
        """``c_o, v_o, upper(M_o)`` per output (actor outputs, then critic), then a continuous actor's
        summed log-std deltas (zero without them), flat: ``stats_length`` values.

        Observations must lie in ``[-1, 1]`` (HE-Adam's gradient bound assumes it)."""
        x = np.asarray(obs, dtype=np.float64)
        t = x.shape[0] if x.ndim == 2 else -1
        deltas = np.concatenate([np.asarray(d_actor, dtype=np.float64).reshape(t, self.num_outputs),
                                 np.asarray(d_critic, dtype=np.float64).reshape(t, 1)], axis=1)
        if x.shape != (t, self.obs_dim):
            raise ValueError(f"observations must have shape (T, {self.obs_dim}), got {x.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(deltas))):
            raise ValueError("observations and deltas must be finite")
        if x.size and np.max(np.abs(x)) > 1.0:
            raise ValueError(f"observations reach {np.max(np.abs(x)):.3g}; scale and clip them to [-1, 1]")
        c = deltas.sum(axis=0)
        v = deltas.T @ x
        m = np.einsum("to,tj,tl->ojl", deltas, x, x)[:, self.upper[0], self.upper[1]]
        spread = np.zeros(self.spread)
        if self.spread and d_log_std is not None:
            spread = np.asarray(d_log_std, dtype=np.float64).reshape(t, self.spread).sum(axis=0)
            if not np.all(np.isfinite(spread)):
                raise ValueError("log-std deltas must be finite")
        return np.concatenate([np.concatenate([c[:, None], v, m], axis=1).ravel(), spread])

    def tile(self, stats: np.ndarray) -> np.ndarray:
        """Slot ``n`` holds the statistic of term ``n``; zero-padded to whole ciphertexts."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.shape != (self.stats_length,):
            raise ValueError(f"statistics must have shape ({self.stats_length},), got {stats.shape}")
        out = np.zeros(self.upload_length)
        out[: self.terms] = stats[self.stat_of]
        return out

    # ----- key holders: coefficients and the slot-sum map -------------------------------------
    def coefficients(self, theta: np.ndarray) -> np.ndarray:
        """Every term's coefficient ``T_ps(theta)``, in slot order (``terms`` values)."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        first = np.where(self._i1 >= 0, theta[np.maximum(self._i1, 0)], 1.0)
        t = theta[np.maximum(self._i2, 0)]
        second = np.choose(self._kind, [np.ones_like(t), t, 1.0 + 2.0 * t, t + t * t])
        return self._const * first * second

    def pack_theta(self, theta: np.ndarray) -> list[np.ndarray]:
        """The coefficients, zero-padded and cut into ``theta_vectors`` ciphertext-sized vectors."""
        out = np.zeros(self.upload_length)
        out[: self.terms] = self.coefficients(theta)
        return list(out.reshape(self.theta_vectors, self.slots))

    def collapse(self, per_slot: list[np.ndarray]) -> np.ndarray:
        """Sum every coordinate's terms: the flat gradient (``num_params`` values)."""
        if len(per_slot) != self.gradient_vectors:
            raise ValueError(f"expected {self.gradient_vectors} per-slot vectors, got {len(per_slot)}")
        flat = np.concatenate([np.asarray(v, dtype=np.float64)[: self.slots] for v in per_slot])
        if flat.size < self.terms:
            raise ValueError(f"per-slot vectors hold {flat.size} values, need {self.terms}")
        return np.bincount(self.param_of, weights=flat[: self.terms], minlength=self.num_params)

    def gradient(self, theta: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """The gradient from summed statistics in plaintext: what the encrypted path computes."""
        return self.collapse(list((self.tile(stats) * np.concatenate(self.pack_theta(theta)))
                                  .reshape(self.gradient_vectors, self.slots)))


@lru_cache(maxsize=16)
def statistics_layout(spec: Any, slots: int) -> StatisticsLayout:
    """The layout of a (hashable) network spec, built once per process: every reply and round reuses it."""
    return StatisticsLayout(spec, slots)


__all__ = ["StatisticsLayout", "statistics_layout"]

"""Update units: the one definition of what a participant encrypts as its update.

A participant's raw update g (a PPO pseudo-gradient or gradient) is L2-clipped to ``C`` (to
``C_dp`` plus its noise share under DP), then multiplied by ``1/n`` for the ``n`` participants of
the round and by HE-Adam's pre-scale ``s`` (docs/he-adam.md). The coordinator's sum is then
``s * G`` with ``|G_j| <= C`` per coordinate, which is HE-Adam's interval guarantee. Norm bounds the
coordinator applies to encrypted updates (robust defenses) go through the same factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def clip_l2(vector: np.ndarray, bound: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm ``bound`` if it is longer."""
    norm = float(np.linalg.norm(vector))
    return vector * (bound / norm) if norm > bound else vector


@dataclass(frozen=True)
class UpdateUnits:
    clip: float  # C
    participants: int  # n, sent by the coordinator with every round
    scale: float  # s, HE-Adam's pre-scale

    @classmethod
    def of(cls, config, participants: int) -> UpdateUnits:
        """From an ``protos.optimizer.HEAdamConfig`` and the round's participant count."""
        return cls(config.clip_bound, max(1, participants), config.update_scale)

    @property
    def factor(self) -> float:
        """s / n: raw units -> encrypted units."""
        return self.scale / self.participants

    def encode(self, update: np.ndarray) -> np.ndarray:
        """An honest update: clipped to C, weighted, pre-scaled."""
        return clip_l2(update, self.clip) * self.factor

    def encode_unclipped(self, update: np.ndarray) -> np.ndarray:
        """Already clipped (DP) or deliberately unclipped (a malicious participant's crafted update)."""
        return update * self.factor

    def bound(self, l2: float) -> float:
        """An L2 bound in raw units, as it applies to encrypted updates."""
        return l2 * self.factor

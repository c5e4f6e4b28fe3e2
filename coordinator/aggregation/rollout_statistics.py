"""The encrypted-rollout gradient from owners' sufficient statistics (``protos.rollout_statistics``).

Each owner's update is its tiled statistics, summed like any update: plainly, or under pairwise
masks that cancel in the sum, so no ciphertext the coordinator holds is one owner's. Then one
ciphertext product per chunk with the refresher's encrypted coefficients (``T(theta)``, depth 1)
gives every term of every gradient coordinate, and one key holder sums the terms under fresh masks
(the collapse of ``rollout_gradient``). HE-Adam steps on the fresh result.
"""

from __future__ import annotations

from coordinator.aggregation.base import Aggregate
from coordinator.aggregation.masked_sum import PairwiseMaskedSum
from coordinator.aggregation.plain_sum import PlainSum
from coordinator.aggregation.rollout_gradient import collapse, tiled_theta


class StatisticsGradient(PlainSum):
    def finish(self) -> Aggregate | None:
        summed = super().finish()  # the federation's statistics, masks (if any) removed
        coefficients = tiled_theta(self) if summed is not None else None
        if coefficients is None:
            return None
        ctx = self.ctx
        layout = ctx.plan.rollout_layout(ctx.backend.slots, ctx.participants)
        with ctx.outcome.timer.phase("encrypted_gradient"):  # the fresh coefficients on the left (TenSEAL)
            terms = [ctx.backend.mul(t, s) for t, s in zip(coefficients.chunks, summed.update.chunks)]
        dense = collapse(self, terms, layout)
        return None if dense is None else Aggregate(dense, summed.stats, summed.contributors)


class MaskedStatisticsGradient(StatisticsGradient, PairwiseMaskedSum):
    """The same, summed under pairwise masks (``PairwiseMaskedSum.finish`` removes them first)."""

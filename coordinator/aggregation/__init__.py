"""Aggregation paths, one module each; the run plan names the path (``RunPlan.aggregation``)."""

from __future__ import annotations

from coordinator.aggregation.base import Aggregate, Aggregation, RoundContext
from coordinator.aggregation.masked_sum import PairwiseMaskedSum
from coordinator.aggregation.plain_sum import PlainSum
from coordinator.aggregation.robust import MedianNorm, NormBound
from coordinator.aggregation.rollout_gradient import MaskedRolloutGradient, RolloutGradient
from coordinator.aggregation.rollout_statistics import MaskedStatisticsGradient, StatisticsGradient

AGGREGATIONS: dict[str, type[Aggregation]] = {
    "sum": PlainSum,
    "pairwise": PairwiseMaskedSum,
    "norm-bound": NormBound,
    "median-norm": MedianNorm,
    "rollout-gradient": RolloutGradient,
    "rollout-gradient-pairwise": MaskedRolloutGradient,
    "rollout-statistics": StatisticsGradient,
    "rollout-statistics-pairwise": MaskedStatisticsGradient,
}

__all__ = ["AGGREGATIONS", "Aggregate", "Aggregation", "RoundContext"]

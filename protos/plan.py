"""The run plan: the scenario, the resolved settings and everything derived from them, once.

Both sides resolve the same plan from the same settings (``resolve_plan``) and pass it around as
one value: the coordinator's driver and aggregation paths, the participants, the tools. Each
derived rule lives here and nowhere else: the server optimizer and its clip bound, update units,
the aggregation path, and the public bound an honest round's aggregate obeys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos.dp import dp_clip_bound
from protos.optimizer import HEAdamConfig
from protos.settings import RunSettings
from protos.update_units import UpdateUnits
from scenarios import Scenario, resolve_run

ROLLOUTS = "encrypted-rollouts"
MASKED_NORM_DEFENSES = ("norm-bound", "median-norm")
# A Gaussian vector of dimension d exceeds sigma (sqrt(d) + sqrt(2x)) with probability below e^-x:
# x = 40 makes a false integrity alarm from DP noise rarer than 1e-17 per round.
NOISE_TAIL_X = 40.0
CKKS_TOLERANCE = 1e-3  # relative slack of the bound for CKKS's approximation error


@dataclass(frozen=True)
class RunPlan:
    scenario: Scenario
    settings: RunSettings  # resolved: seed, rounds, profile and masking filled in
    optimizer: HEAdamConfig  # the server optimizer of the mode; its clip_bound is the run's C

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def rollouts(self) -> bool:
        return self.settings.mode == ROLLOUTS

    @property
    def num_params(self) -> int:
        return self.scenario.network(self.mode).num_params

    @property
    def aggregation(self) -> str:
        """The aggregation path (``coordinator.aggregation``): how replies become the aggregate."""
        if self.rollouts:
            return "rollout-gradient"
        if self.settings.defense in MASKED_NORM_DEFENSES:
            return self.settings.defense
        return "pairwise" if self.settings.masking == "pairwise" else "sum"

    def units(self, participants: int) -> UpdateUnits:
        return UpdateUnits.of(self.optimizer, participants)

    def aggregate_bound(self, contributors: int, participants: int) -> float:
        """The L2 norm an honest round's aggregate (update units) cannot exceed.

        ``contributors`` honest updates, each weighted ``1/participants``: in local-ppo mode each is
        clipped to L2 norm C (to C_dp plus its Gaussian noise share under DP); encrypted-rollout
        owners clip every coordinate to C, so their L2 norm is at most C sqrt(d).
        """
        clip, z = self.optimizer.clip_bound, self.settings.dp_noise_multiplier
        if self.rollouts:
            raw = contributors * clip * math.sqrt(self.num_params)
        elif z > 0:
            c_dp = dp_clip_bound(clip, z, participants)
            noise_std = z * c_dp * math.sqrt(contributors / participants)
            raw = contributors * c_dp + noise_std * (math.sqrt(self.num_params) + math.sqrt(2 * NOISE_TAIL_X))
        else:
            raw = contributors * clip
        return self.units(participants).bound(raw) * (1 + CKKS_TOLERANCE)


def resolve_plan(settings: RunSettings, participants: int = 0) -> RunPlan:
    """The plan of a run with ``participants`` organizations (0: not known yet, every node)."""
    scenario, resolved = resolve_run(settings, participants)
    return RunPlan(scenario, resolved, HEAdamConfig.for_scenario(scenario, resolved.mode))

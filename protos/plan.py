"""The run plan: the scenario, the resolved settings and everything derived from them, once.

Both sides resolve the same plan from the same settings (``resolve_plan``) and pass it around as
one value: the coordinator's driver and aggregation paths, the participants, the tools. Each
derived rule lives here and nowhere else: the server optimizer and its clip bound, update units,
the aggregation path, and the public bound an honest round's aggregate obeys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from protos.dp import dp_clip_bound
from protos.optimizer import HEAdamConfig
from protos.rollout_layout import BlockLayout, layout_for_round
from protos.rollout_statistics import StatisticsLayout, statistics_layout
from protos.settings import MASKING, RunSettings
from protos.update_units import UpdateUnits
from scenarios import Scenario, load_scenario
from scenarios.scenario import MODES, RobustConfig

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
    def statistics(self) -> bool:
        """Encrypted-rollout owners send sufficient statistics (``protos.rollout_statistics``)."""
        return self.rollouts and self.settings.rollout_upload == "statistics"

    def rollout_layout(self, slots: int, participants: int) -> BlockLayout | StatisticsLayout:
        """The slot layout of a round in encrypted-rollout mode, the same on every side."""
        if self.statistics:
            return statistics_layout(self.scenario.poly_spec(), slots)
        return layout_for_round(self.scenario, slots, participants)

    def update_length(self, slots: int) -> int:
        """Values in a participant's update: theta's size, or an owner's tiled statistics."""
        return self.rollout_layout(slots, 1).upload_length if self.statistics else self.num_params

    @property
    def aggregation(self) -> str:
        """The aggregation path (``coordinator.aggregation``): how replies become the aggregate."""
        if self.statistics:
            return "rollout-statistics" + ("-pairwise" if self.settings.masking == "pairwise" else "")
        if self.rollouts:
            return "rollout-gradient" + ("-pairwise" if self.settings.masking == "pairwise" else "")
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


# The robust defenses that clip each update by its own (masked) norm: they need Enc(u_i) per participant.
MIN_MASKING_PARTICIPANTS = 3  # with 2, each one's masks are known to the other: nothing to hide behind


def resolve_masking(settings, participants: int = 0) -> str:
    """``pairwise`` or ``off`` for a run with ``participants`` organizations (0: not known, all nodes).

    ``auto`` is pairwise unless something rules masks out or 1-2 participants take part. Asking for
    ``pairwise`` where masks cannot work is an error that says why.
    """
    if settings.masking not in MASKING:
        raise ValueError(f"unknown masking {settings.masking!r}; known: {', '.join(MASKING)}")
    conflicts = {
        f"defense {settings.defense} (it needs each update's own norm, and under pairwise masks no ciphertext "
        "holds one participant's update)": settings.defense in MASKED_NORM_DEFENSES,
        "--plaintext (the baseline has no keys and no roster)": settings.plaintext,
    }
    reasons = [reason for reason, on in conflicts.items() if on]
    if settings.masking == "pairwise" and reasons:
        raise ValueError(f"masking pairwise does not combine with {'; nor with '.join(reasons)}; use masking off")
    if settings.masking == "auto":
        few = 0 < participants < MIN_MASKING_PARTICIPANTS
        return "off" if reasons or few else "pairwise"
    return settings.masking


def resolve_run(settings: RunSettings, participants: int = 0) -> tuple[Scenario, RunSettings]:
    """The scenario a run trains and its settings with every scenario default filled in.

    One rule for the coordinator, the participants and the tools: ``seed`` -1 becomes the
    scenario's seed, ``num_server_rounds`` 0 its rounds, an empty ``he_profile`` its profile; a
    non-empty ``he_profile`` or ``robust_training`` (JSON of ``RobustConfig`` fields) overrides the
    scenario; ``masking`` auto becomes pairwise or off (``resolve_masking``; ``participants``, else
    ``settings.participants``, is the number of organizations when the caller knows it).
    """
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; known: {', '.join(MODES)}")
    scenario = load_scenario(settings.scenario)
    if settings.mode == "encrypted-rollouts":
        lab = {
            "party-mix": bool(settings.party_mix or scenario.party_mix),
            "robust-training": bool(settings.robust_training),
            "defense": settings.defense != "none",
            "dp-noise-multiplier": settings.dp_noise_multiplier > 0,
        }
        if any(lab.values()):
            raise ValueError(
                f"mode encrypted-rollouts does not combine with {', '.join(k for k, on in lab.items() if on)} yet "
                "(its owners send rollouts, not updates); use --mode local-ppo for threat-lab experiments"
            )
    if settings.he_profile:
        scenario = scenario.with_overrides(he_profile=settings.he_profile)
    if settings.robust_training:
        try:
            robust = RobustConfig(**json.loads(settings.robust_training))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"robust-training must be a JSON object of RobustConfig fields: {exc}") from None
        scenario = scenario.with_overrides(ppo=dataclasses.replace(scenario.ppo, robust=robust))
    resolved = dataclasses.replace(
        settings,
        seed=settings.seed if settings.seed >= 0 else scenario.seed,
        num_server_rounds=settings.num_server_rounds
        or (scenario.rollout.rounds if settings.mode == "encrypted-rollouts" else scenario.rounds),
        he_profile=scenario.he_profile,
        masking=resolve_masking(settings, participants or settings.participants),
    )
    return scenario, resolved


def resolve_plan(settings: RunSettings, participants: int = 0) -> RunPlan:
    """The plan of a run with ``participants`` organizations (0: not known yet, every node)."""
    scenario, resolved = resolve_run(settings, participants)
    optimizer = HEAdamConfig.of(scenario.server_optimizer(resolved.mode), resolved.server_optimizer)
    return RunPlan(scenario, resolved, optimizer)

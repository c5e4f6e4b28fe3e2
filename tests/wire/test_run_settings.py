"""Run settings: the Flower app's run config and RunSettings name the same keys, resolved by one rule."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from participant.policy import COORDINATOR_MAY_SET, NODE_DECIDES
from protos.plan import resolve_plan
from protos.settings import RunSettings
from scenarios import load_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_app_run_config_declares_what_the_coordinator_may_set():
    """Flower rejects run-config keys the app does not declare; RunSettings ignores unknown ones. What each node
    decides itself is not declared, except participant-key-dir: the key directory of `flwr run`'s local simulation
    (a deployed node refuses it)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    coordinator = {name.replace("_", "-") for name in COORDINATOR_MAY_SET}
    assert set(declared) == coordinator | {"participant-key-dir"}
    assert coordinator | {name.replace("_", "-") for name in NODE_DECIDES} == {
        f.name.replace("_", "-") for f in fields(RunSettings)}
    assert RunSettings.from_run_config(declared) == RunSettings()


def test_defaults_are_resolved_from_the_scenario_once():
    run = resolve_plan(RunSettings(scenario="acrobot")).settings
    default = load_scenario("acrobot")
    assert (run.seed, run.num_server_rounds, run.he_profile) == (default.seed, default.rounds, default.he_profile)
    explicit = resolve_plan(RunSettings(scenario="acrobot", seed=3, num_server_rounds=7, he_profile="n16k-d7")).settings
    assert (explicit.seed, explicit.num_server_rounds, explicit.he_profile) == (3, 7, "n16k-d7")
    assert resolve_plan(explicit).settings == explicit  # resolving twice changes nothing


def test_masking_auto_is_pairwise_with_three_or_more_participants_and_local_ppo():
    masking = lambda n=0, **kw: resolve_plan(RunSettings(**kw), n).settings.masking  # noqa: E731
    assert masking() == "pairwise" and masking(3) == "pairwise" and masking(10) == "pairwise"
    assert masking(2) == "off" and masking(participants=2) == "off"
    assert masking(defense="median-norm") == "off" and masking(defense="norm-bound") == "off"
    assert masking(defense="dp", dp_noise_multiplier=1.0) == "pairwise"  # DP noise is added before masking
    assert masking(mode="encrypted-rollouts") == "pairwise"  # owners' statistics are summed like updates
    assert masking(mode="encrypted-rollouts", rollout_upload="transitions") == "pairwise"  # owners' updates, too
    assert masking(plaintext=True) == "off"
    assert masking(2, masking="pairwise") == "pairwise" and masking(masking="off") == "off"


@pytest.mark.parametrize(
    "settings, reason",
    [
        (RunSettings(masking="pairwise", defense="median-norm"), "needs each update's own norm"),
        (RunSettings(masking="pairwise", defense="norm-bound"), "needs each update's own norm"),
        (RunSettings(masking="pairwise", plaintext=True), "no keys and no roster"),
        (RunSettings(masking="sometimes"), "unknown masking"),
    ],
)
def test_masking_pairwise_is_refused_where_masks_cannot_work(settings, reason):
    with pytest.raises(ValueError, match=reason):
        resolve_plan(settings)


def test_the_coordinator_refuses_masking_with_masked_norm_defenses_and_encrypted_rollouts():
    """The coordinator resolves its run plan by the same rule (``protos.plan.resolve_plan``), and its
    aggregation path takes masked updates only where masks can work."""
    from coordinator.aggregation import AGGREGATIONS
    from coordinator.robust_aggregation import ROBUST_DEFENSES
    from protos.plan import RunPlan, resolve_plan

    for defense in ROBUST_DEFENSES:
        with pytest.raises(ValueError, match="needs each update's own norm"):
            resolve_plan(RunSettings(masking="pairwise", defense=defense))
        assert resolve_plan(RunSettings(defense=defense)).aggregation == defense  # auto: masking off
        # a plan that names both (unresolved) still sums each update's own norm: masks never reach it
        plan = resolve_plan(RunSettings(defense=defense))
        forced = RunPlan(plan.scenario, dataclasses.replace(plan.settings, masking="pairwise"), plan.optimizer)
        assert forced.aggregation == defense and not getattr(AGGREGATIONS[defense], "masked", False)
    transitions = RunSettings(mode="encrypted-rollouts", rollout_upload="transitions")
    masked = resolve_plan(transitions)
    assert masked.aggregation == "rollout-gradient-pairwise" and AGGREGATIONS[masked.aggregation].masked
    unmasked = resolve_plan(dataclasses.replace(transitions, masking="off"))
    assert unmasked.aggregation == "rollout-gradient" and not AGGREGATIONS[unmasked.aggregation].masked
    statistics = resolve_plan(RunSettings(mode="encrypted-rollouts"))
    assert statistics.aggregation == "rollout-statistics-pairwise" and AGGREGATIONS[statistics.aggregation].masked
    unmasked = resolve_plan(RunSettings(mode="encrypted-rollouts", masking="off"))
    assert unmasked.aggregation == "rollout-statistics" and not AGGREGATIONS[unmasked.aggregation].masked
    assert resolve_plan(RunSettings(masking="off", defense="median-norm")).aggregation == "median-norm"
    dp = resolve_plan(RunSettings(masking="pairwise", defense="dp", dp_noise_multiplier=1.0))
    assert dp.aggregation == "pairwise" and AGGREGATIONS[dp.aggregation].masked  # DP noise is added before masking
    assert resolve_plan(RunSettings(masking="off")).aggregation == "sum" and not AGGREGATIONS["sum"].masked

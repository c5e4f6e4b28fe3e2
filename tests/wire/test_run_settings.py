"""Run settings: the Flower app's run config and RunSettings name the same keys, resolved by one rule."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from participant.policy import COORDINATOR_MAY_SET, NODE_DECIDES
from protos.settings import RunSettings
from scenarios import load_scenario, resolve_run

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
    scenario, run = resolve_run(RunSettings(scenario="acrobot"))
    default = load_scenario("acrobot")
    assert (run.seed, run.num_server_rounds, run.he_profile) == (default.seed, default.rounds, default.he_profile)
    _, explicit = resolve_run(RunSettings(scenario="acrobot", seed=3, num_server_rounds=7, he_profile="n16k-d7"))
    assert (explicit.seed, explicit.num_server_rounds, explicit.he_profile) == (3, 7, "n16k-d7")
    assert resolve_run(explicit)[1] == explicit  # resolving twice changes nothing


def test_masking_auto_is_pairwise_with_three_or_more_participants_and_local_ppo():
    masking = lambda n=0, **kw: resolve_run(RunSettings(**kw), n)[1].masking  # noqa: E731
    assert masking() == "pairwise" and masking(3) == "pairwise" and masking(10) == "pairwise"
    assert masking(2) == "off" and masking(participants=2) == "off"
    assert masking(defense="median-norm") == "off" and masking(defense="norm-bound") == "off"
    assert masking(defense="dp", dp_noise_multiplier=1.0) == "pairwise"  # DP noise is added before masking
    assert masking(mode="encrypted-rollouts") == "off" and masking(plaintext=True) == "off"
    assert masking(2, masking="pairwise") == "pairwise" and masking(masking="off") == "off"


@pytest.mark.parametrize(
    "settings, reason",
    [
        (RunSettings(masking="pairwise", defense="median-norm"), "needs each update's own norm"),
        (RunSettings(masking="pairwise", defense="norm-bound"), "needs each update's own norm"),
        (RunSettings(masking="pairwise", mode="encrypted-rollouts"), "masks would not cancel"),
        (RunSettings(masking="pairwise", plaintext=True), "no keys and no roster"),
        (RunSettings(masking="sometimes"), "unknown masking"),
    ],
)
def test_masking_pairwise_is_refused_where_masks_cannot_work(settings, reason):
    with pytest.raises(ValueError, match=reason):
        resolve_run(settings)


def test_the_coordinator_refuses_masking_with_masked_norm_defenses_and_encrypted_rollouts():
    from coordinator.robust_aggregation import ROBUST_DEFENSES
    from coordinator.unmasking import check_masking

    for defense in ROBUST_DEFENSES:
        with pytest.raises(ValueError, match="needs each update's own norm"):
            check_masking("pairwise", defense, ROBUST_DEFENSES, rollouts=False)
    with pytest.raises(ValueError, match="encrypted-rollouts"):
        check_masking("pairwise", "none", ROBUST_DEFENSES, rollouts=True)
    check_masking("off", "median-norm", ROBUST_DEFENSES, rollouts=True)
    check_masking("pairwise", "dp", ROBUST_DEFENSES, rollouts=False)

"""Run settings: the Flower app's run config and RunSettings name the same keys, resolved by one rule."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from protos.settings import RunSettings
from scenarios import load_scenario, resolve_run

ROOT = Path(__file__).resolve().parents[2]


def test_app_run_config_declares_exactly_the_run_settings():
    """Flower rejects run-config keys the app does not declare; RunSettings ignores unknown ones."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == {f.name.replace("_", "-") for f in fields(RunSettings)}
    assert RunSettings.from_run_config(declared) == RunSettings()


def test_defaults_are_resolved_from_the_scenario_once():
    scenario, run = resolve_run(RunSettings(scenario="acrobot"))
    default = load_scenario("acrobot")
    assert (run.seed, run.num_server_rounds, run.he_profile) == (default.seed, default.rounds, default.he_profile)
    _, explicit = resolve_run(RunSettings(scenario="acrobot", seed=3, num_server_rounds=7, he_profile="n16k-d7"))
    assert (explicit.seed, explicit.num_server_rounds, explicit.he_profile) == (3, 7, "n16k-d7")
    assert resolve_run(explicit)[1] == explicit  # resolving twice changes nothing

"""Scenario definitions, the built-in set, the registry and the NumPy actor-critic."""

from scenarios.builtin import BUILTIN_SCENARIOS
from scenarios.policy import Policy, PolicySpec, PPOBatch, PPOLossInfo
from scenarios.registry import (
    ENTRY_POINT_GROUP,
    ScenarioFileError,
    UnknownScenarioError,
    list_scenarios,
    load_scenario,
)
from scenarios.scenario import PPOConfig, Scenario, ServerOptimizer

__all__ = [
    "BUILTIN_SCENARIOS",
    "ENTRY_POINT_GROUP",
    "PPOBatch",
    "PPOConfig",
    "PPOLossInfo",
    "Policy",
    "PolicySpec",
    "Scenario",
    "ServerOptimizer",
    "ScenarioFileError",
    "UnknownScenarioError",
    "list_scenarios",
    "load_scenario",
]

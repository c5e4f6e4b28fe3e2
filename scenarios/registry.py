"""Resolve a scenario reference: built-in name, installed entry point, or a .py file."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from scenarios.builtin import BUILTIN_SCENARIOS
from scenarios.scenario import Scenario

ENTRY_POINT_GROUP = "fedhe.scenarios"


class UnknownScenarioError(ValueError):
    """Raised for a reference that is neither built-in, an entry point, nor a file."""


class ScenarioFileError(ValueError):
    """Raised when a scenario file cannot be loaded or does not define a Scenario."""


def load_scenario(ref: str) -> Scenario:
    """A ref ending in .py is a path; otherwise built-ins win over entry points, then existing files."""
    if ref.endswith(".py"):
        return _load_file(Path(ref))
    if ref in BUILTIN_SCENARIOS:
        return BUILTIN_SCENARIOS[ref]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == ref:
            return _from_entry_point(ep)
    if Path(ref).is_file():
        return _load_file(Path(ref))
    known = ", ".join(name for name, _ in list_scenarios())
    raise UnknownScenarioError(
        f"unknown scenario {ref!r}; known: {known}. To add one, pass a path to a .py file defining "
        f"SCENARIO = Scenario(...), or register an entry point in group {ENTRY_POINT_GROUP!r} "
        f"(e.g. [project.entry-points.\"{ENTRY_POINT_GROUP}\"] myenv = \"mypkg.scenarios:SCENARIO\")."
    )


@functools.lru_cache(maxsize=1)
def installed_scenarios() -> frozenset[str]:
    """Names of the built-ins and installed entry points: code this machine's owner installed, not code a
    run names (a ``.py`` path is imported from wherever the reference points)."""
    return frozenset(name for name, _ in list_scenarios())


def list_scenarios() -> list[tuple[str, str]]:
    """(name, source/description) for built-ins and installed entry points."""
    found = [(name, f"builtin: {s.description}") for name, s in BUILTIN_SCENARIOS.items()]
    found += [
        (ep.name, f"entry point: {ep.value}")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.name not in BUILTIN_SCENARIOS
    ]
    return found


def _from_entry_point(ep: importlib.metadata.EntryPoint) -> Scenario:
    obj = ep.load()
    if not isinstance(obj, Scenario) and callable(obj):
        obj = obj()
    if not isinstance(obj, Scenario):
        raise TypeError(f"entry point {ep.name!r} ({ep.value}) gave {type(obj).__name__}, expected a Scenario "
                        "or a zero-argument callable returning one")
    return obj


def _load_file(path: Path) -> Scenario:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ScenarioFileError(f"scenario file {path} does not exist")
    # A unique module name per file keeps two scenario files with the same stem apart.
    module_name = "fedhe_scenario_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ScenarioFileError(f"cannot import scenario file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ScenarioFileError(f"scenario file {path} failed to import: {exc!r}") from exc
    scenario = getattr(module, "SCENARIO", None)
    if scenario is None:
        raise ScenarioFileError(f"scenario file {path} does not define SCENARIO = Scenario(...)")
    if not isinstance(scenario, Scenario):
        raise ScenarioFileError(f"SCENARIO in {path} is a {type(scenario).__name__}, expected scenarios.Scenario")
    return scenario

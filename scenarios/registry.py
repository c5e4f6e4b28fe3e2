"""Resolve a scenario reference: built-in name, installed entry point, or a .py file."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import TypeVar

from scenarios.builtin import BUILTIN_SCENARIOS
from scenarios.scenario import MODES, RobustConfig, Scenario

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


S = TypeVar("S")

MASKING = ("auto", "pairwise", "off")
# The robust defenses that clip each update by its own (masked) norm: they need Enc(u_i) per participant.
MASKED_NORM_DEFENSES = ("norm-bound", "median-norm")
MIN_MASKING_PARTICIPANTS = 3  # with 2, each one's masks are known to the other: nothing to hide behind


def resolve_masking(settings, participants: int = 0) -> str:
    """``pairwise`` or ``off`` for a run with ``participants`` organizations (0: not known, all nodes).

    ``auto`` is pairwise unless something rules masks out or 1-2 participants take part. Asking for
    ``pairwise`` where masks cannot work is an error that says why.
    """
    if settings.masking not in MASKING:
        raise ValueError(f"unknown masking {settings.masking!r}; known: {', '.join(MASKING)}")
    conflicts = {
        "mode encrypted-rollouts (the coordinator multiplies each owner's ciphertexts, so masks would not "
        "cancel)": settings.mode == "encrypted-rollouts",
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


def resolve_run(settings: S, participants: int = 0) -> tuple[Scenario, S]:
    """The scenario a run trains and its settings with every scenario default filled in.

    One rule for the coordinator, the participants and the tools: ``seed`` -1 becomes the
    scenario's seed, ``num_server_rounds`` 0 its rounds, an empty ``he_profile`` its profile; a
    non-empty ``he_profile`` or ``robust_training`` (JSON of ``RobustConfig`` fields) overrides the
    scenario; ``masking`` auto becomes pairwise or off (``resolve_masking``; ``participants``, else
    ``settings.participants``, is the number of organizations when the caller knows it).
    ``settings`` is a ``protos.settings.RunSettings`` (any dataclass with those fields).
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

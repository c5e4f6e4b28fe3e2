"""Run directories as the tools see them: the federation key, the recorded settings, the policy.

The coordinator writes ``run.json`` (the resolved public settings) and the encrypted checkpoint;
only a key holder can turn the checkpoint back into a policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.checkpoint import load_checkpoint
from coordinator.server_app import RUN_INFO_FILE
from participant.keyholder import KeyHolder, PlainKeyHolder, decrypt_vector, generate_keys, load_keyholder
from participant.owner_key import simulated_owner_keys
from participant.roster import simulated_organizations
from protos.errors import CheckpointError, KeyFileError
from protos.keyfile import PARTICIPANT_KEY, inspect_key_file
from protos.plan import resolve_plan
from protos.profiles import get_profile
from protos.settings import RunSettings
from scenarios import Scenario

KEYS_DIR = "keys"


def ensure_keys(key_dir: Path, profile: str, organizations: int = 0, owners: int = 0) -> Path:
    """The federation key in ``key_dir``, created with ``profile`` if there is none yet.

    ``organizations`` > 0 (pairwise masking): also an X25519 key pair per simulated organization
    and the roster of indices 0..organizations-1 (an existing roster is extended, never replaced).
    ``owners`` > 0 (transition uploads): each simulated organization's own CKKS key pair, registered
    with the coordinator (``participant.owner_key``).
    """
    key_dir = Path(key_dir)
    if not (key_dir / PARTICIPANT_KEY).exists():
        fingerprint = generate_keys(key_dir, profile).fingerprint
    else:
        info = inspect_key_file(key_dir / PARTICIPANT_KEY)
        if info.profile.name != profile:
            raise KeyFileError(
                f"the key in {key_dir} uses HE profile {info.profile.name}, this run needs {profile}; "
                f"pass another --key-dir or create one with `fedhe keygen --profile {profile}`"
            )
        fingerprint = info.fingerprint
    if organizations > 0:
        simulated_organizations(key_dir, fingerprint, organizations)
    if owners > 0:
        simulated_owner_keys(key_dir, tuple(f"participant-{i}" for i in range(owners)), profile)
    return key_dir


def find_keys(run_dir: Path) -> Path:
    """The nearest ``keys/`` at or above ``run_dir`` (simulate and the lab grids put it there)."""
    for directory in [Path(run_dir), *Path(run_dir).resolve().parents][:4]:
        if (directory / KEYS_DIR / PARTICIPANT_KEY).is_file():
            return directory / KEYS_DIR
    raise KeyFileError(f"no {KEYS_DIR}/{PARTICIPANT_KEY} in or above {run_dir}; pass --key-dir DIR")


def recorded_settings(run_dir: Path, scenario_ref: str | None = None) -> tuple[Scenario, RunSettings]:
    """The scenario and resolved settings the coordinator recorded in ``run.json``."""
    path = Path(run_dir) / RUN_INFO_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a fedhe run directory (no {RUN_INFO_FILE})")
    info = json.loads(path.read_text())
    settings = RunSettings(scenario=scenario_ref or info["scenario_ref"], plaintext=info["plaintext"],
                           seed=info.get("seed", -1), he_profile=info.get("he_profile", ""),
                           robust_training=info.get("robust_training", ""), mode=info.get("mode", "local-ppo"),
                           rollout_upload=info.get("rollout_upload", "transitions"),
                           server_optimizer=info.get("server_optimizer", "adam"),
                           masking=info.get("masking", "auto"))
    plan = resolve_plan(settings)
    return plan.scenario, plan.settings


@dataclass
class TrainedPolicy:
    scenario: Scenario
    settings: RunSettings
    theta: np.ndarray
    round: int  # the last completed round


def decrypt_policy(run_dir: Path, key_dir: Path | None = None, scenario_ref: str | None = None) -> TrainedPolicy:
    """Decrypt the checkpoint's policy with the federation key (the run's own profile)."""
    scenario, settings = recorded_settings(run_dir, scenario_ref)
    holder: KeyHolder
    if settings.plaintext:
        holder = PlainKeyHolder(get_profile(settings.he_profile))
    else:
        holder = load_keyholder(Path(key_dir) if key_dir else find_keys(run_dir))
    state, _ = load_checkpoint(Path(run_dir), holder, scenario.name, scenario.network(settings.mode).num_params)
    if state.optimizer is None:
        raise CheckpointError(f"the checkpoint in {run_dir} has no policy yet (no round completed)")
    return TrainedPolicy(scenario, settings, decrypt_vector(holder, state.optimizer.theta), state.round)

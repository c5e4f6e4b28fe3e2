"""`fedhe evaluate`: decrypt the latest checkpoint's policy and run it greedily.

Only a key holder can do this: the checkpoint on the coordinator's disk is ciphertext.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coordinator.checkpoint import load_checkpoint
from coordinator.server_app import RUN_INFO_FILE
from participant.keyholder import PlainKeyHolder, decrypt_vector, load_keyholder
from participant.rollout import evaluate_policy
from protos.errors import CheckpointError
from protos.profiles import get_profile
from scenarios import Policy, load_scenario


def evaluate_run(
    run_dir: Path,
    key_dir: Path | None = None,
    episodes: int = 20,
    scenario_ref: str | None = None,
    participant_index: int = 0,
    seed: int = 10_000,
) -> dict:
    info_path = Path(run_dir) / RUN_INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{run_dir} is not a fedhe run directory (no {RUN_INFO_FILE})")
    info = json.loads(info_path.read_text())
    scenario = load_scenario(scenario_ref or info["scenario_ref"])
    if info["plaintext"]:
        holder = PlainKeyHolder(get_profile(scenario.he_profile))
    else:
        holder = load_keyholder(Path(key_dir) if key_dir else Path(run_dir) / "keys")
    spec = scenario.policy_spec()
    state = load_checkpoint(Path(run_dir), holder, scenario.name, spec.num_params)
    if state.optimizer is None:
        raise CheckpointError(f"the checkpoint in {run_dir} has no policy yet (no round completed)")
    theta = decrypt_vector(holder, state.optimizer.theta)
    env = scenario.build_env(participant_index, seed)
    try:
        returns = evaluate_policy(env, Policy(spec, theta), episodes, seed, greedy=True)
    finally:
        env.close()
    return {
        "scenario": scenario.name,
        "round": state.round,
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "reward_threshold": scenario.reward_threshold,
    }

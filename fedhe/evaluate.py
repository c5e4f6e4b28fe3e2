"""`fedhe evaluate`: decrypt the latest checkpoint's policy and run it greedily.

Only a key holder can do this: the checkpoint on the coordinator's disk is ciphertext.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhe.run_dir import decrypt_policy
from scenarios.rollout import evaluate_policy


def evaluate_run(
    run_dir: Path,
    key_dir: Path | None = None,
    episodes: int = 20,
    scenario_ref: str | None = None,
    participant_index: int = 0,
    seed: int = 10_000,
) -> dict:
    trained = decrypt_policy(run_dir, key_dir, scenario_ref)
    scenario = trained.scenario
    env = scenario.build_env(participant_index, seed)
    try:
        policy = scenario.make_policy(trained.settings.mode, trained.theta)
        returns = evaluate_policy(env, policy, episodes, seed, greedy=True)
    finally:
        env.close()
    return {
        "scenario": scenario.name,
        "round": trained.round,
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "reward_threshold": scenario.reward_threshold,
    }

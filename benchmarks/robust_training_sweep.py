"""Plaintext sweep of robust-training settings: train per seed, attack the policy, print JSON.

Screening tool for `fedhe.lab.policy_grid.ROBUST_OVERRIDES` (the numbers that count come
from encrypted `fedhe robustness policy` runs; this single-process harness is only indicative).
Each seed trains `plain_federated_rl.run` with ``ppo.robust`` from ``--robust`` and evaluates the
final policy clean and under ``--attacks`` at ``--epsilon`` (``--sigma``: a per-dimension list, 0
leaves a dimension unattacked; default the scenario's reference sigma).

    python benchmarks/robust_training_sweep.py --scenario cartpole --no-stop
    python benchmarks/robust_training_sweep.py --scenario cartpole --no-stop \\
        --robust '{"mode": "sa-ppo", "kappa": 0.02, "epsilon": 0.5, "attack_steps": 3}'
    python benchmarks/robust_training_sweep.py --scenario cartpole --no-stop --sigma 0,0,0,0.768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also as `python benchmarks/robust_training_sweep.py`

from benchmarks.plain_federated_rl import run  # noqa: E402
from fedhe.lab.policy_attacks import reference_std  # noqa: E402
from fedhe.lab.policy_grid import evaluate_policy_robustness  # noqa: E402
from scenarios import load_scenario  # noqa: E402
from scenarios.scenario import RobustConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="cartpole")
    parser.add_argument("--robust", default="{}", help="ppo.robust as JSON ({} = vanilla); obs_std defaults to --sigma")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--sigma", default=None, help="comma-separated per-dimension sigma (default: reference)")
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--attacks", default="fgsm,gaussian")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=None, help="default: scenario.rounds")
    parser.add_argument("--no-stop", action="store_true", help="train the full round budget")
    args = parser.parse_args()

    base = load_scenario(args.scenario)
    sigma = (np.array([float(x) for x in args.sigma.split(",")]) if args.sigma else reference_std(base))
    robust = json.loads(args.robust)
    scenario = base
    if robust:
        robust.setdefault("obs_std", [float(x) for x in np.maximum(sigma, 1e-6)])
        scenario = base.with_overrides(ppo=dataclasses.replace(base.ppo, robust=RobustConfig(**robust)))
    attacks = args.attacks.split(",")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        result = run(scenario, scenario.num_participants, seed, args.rounds or scenario.rounds, not args.no_stop)
        res = evaluate_policy_robustness(scenario, result["theta"], attacks, args.epsilon, args.episodes, seed,
                                         obs_std=sigma)
        rows.append({"seed": seed, "rounds_to_solve": result["rounds_to_solve"], "final_return": result["final_return"],
                     "clean_return": res["clean_return"],
                     **{f"crr_{r['eval_attack']}": r["crr"] for r in res["rows"]},
                     **{f"pd_tv_{r['eval_attack']}": r["pd_tv"] for r in res["rows"]}})
    mean = {f"crr_{a}": float(np.mean([r[f"crr_{a}"] for r in rows])) for a in attacks}
    print(json.dumps({"scenario": base.name, "robust": robust, "sigma": [float(x) for x in sigma],
                      "epsilon": args.epsilon, "full_budget": args.no_stop, "mean": mean, "seeds": rows}))


if __name__ == "__main__":
    main()

"""Plaintext, single-process simulation of the federation's math, for tuning scenario defaults.

Each round every participant trains from the shared theta, its update is clipped to
L2 norm C and scaled by 1/n, and the sum goes through the same Adam variant the
coordinator evaluates on ciphertexts.  Prints one JSON object.

    python benchmarks/plain_federated_rl.py --scenario cartpole --participants 3 --seed 0
    python benchmarks/plain_federated_rl.py --scenario cartpole --set ppo.lr=3e-4 --set server.clip_bound=0.5
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

# Tiny matrices: BLAS threads only add contention (measured ~1.5x faster on 2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.numpy_adam import NumpyAdam  # noqa: E402
from participant.ppo import ParticipantTrainer  # noqa: E402
from protos.optimizer import HEAdamConfig  # noqa: E402
from protos.update_units import clip_l2  # noqa: E402
from scenarios import Policy, Scenario, load_scenario  # noqa: E402
from scenarios.rollout import evaluate_policy  # noqa: E402


def run(scenario: Scenario, participants: int, seed: int, rounds: int, stop_on_solve: bool) -> dict:
    spec = scenario.policy_spec()
    theta = spec.init(seed)
    trainers = [ParticipantTrainer(scenario, i, seed) for i in range(participants)]
    server = NumpyAdam(theta.size, HEAdamConfig.of(scenario.server))
    window: deque[float] = deque(maxlen=100)
    history, norms = [], []
    solved_at, steps, episodes = None, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for rnd in range(rounds):
        total = np.zeros_like(theta)
        round_returns: list[float] = []
        for trainer in trainers:
            result = trainer.train(theta, rnd + 1, rounds)  # rounds count from 1, as in the federation
            norms.append(float(np.linalg.norm(result.update)))
            total += clip_l2(result.update, scenario.server.clip_bound) / participants
            round_returns += result.episode_returns
            steps += result.steps
            episodes += result.episodes
        theta = server.step(theta, total)
        window.extend(round_returns)
        mean100 = float(np.mean(window)) if window else float("nan")
        history.append(round(mean100, 2))
        threshold = scenario.reward_threshold
        if solved_at is None and threshold is not None and len(window) == window.maxlen and mean100 >= threshold:
            solved_at = rnd + 1
            if stop_on_solve:
                break
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    for trainer in trainers:
        trainer.close()
    return {
        "theta": theta,
        "solved": solved_at is not None,
        "rounds_to_solve": solved_at,
        "rounds": len(history),
        "final_return": history[-1] if history else None,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),  # load-independent when other jobs share the cores
        "env_steps": steps,
        "episodes": episodes,
        "update_norm_median": round(float(np.median(norms)), 4),
        "history": history,
    }


def parse_override(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def apply_overrides(scenario: Scenario, overrides: list[str]) -> Scenario:
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {"ppo": {}, "server": {}}
    for text in overrides:
        key, value = parse_override(text)
        group, _, field = key.partition(".")
        if field and group in nested:
            nested[group][field] = value
        else:
            top[key] = value
    for group, fields in nested.items():
        if fields:
            top[group] = dataclasses.replace(getattr(scenario, group), **fields)
    return scenario.with_overrides(**top) if top else scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="cartpole")
    parser.add_argument("--participants", type=int, default=None, help="default: scenario.num_participants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="default: scenario.rounds")
    parser.add_argument("--no-stop", action="store_true", help="keep training after the threshold is reached")
    parser.add_argument("--eval-episodes", type=int, default=20, help="greedy evaluation of the final theta")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario field, e.g. ppo.lr=3e-4 or server.clip_bound=0.5")
    parser.add_argument("--history", action="store_true", help="include the per-round last-100 mean")
    args = parser.parse_args()

    scenario = apply_overrides(load_scenario(args.scenario), args.set)
    participants = args.participants or scenario.num_participants
    result = run(scenario, participants, args.seed, args.rounds or scenario.rounds, not args.no_stop)
    theta = result.pop("theta")
    if not args.history:
        result.pop("history")
    if args.eval_episodes > 0:
        env = scenario.build_env(0, args.seed)
        returns = evaluate_policy(env, Policy(scenario.policy_spec(), theta), args.eval_episodes, 10_000 + args.seed)
        env.close()
        result["greedy_return"] = round(float(np.mean(returns)), 2)
    print(json.dumps({"scenario": scenario.name, "participants": participants, "seed": args.seed,
                      "num_params": scenario.policy_spec().num_params, "overrides": args.set, **result}))


if __name__ == "__main__":
    main()

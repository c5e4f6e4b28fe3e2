"""`fedhe bench federation`: encrypted vs plaintext federations, same protocol, several seeds.

Both run the identical protocol (``--mode`` picks the training mode) for the same fixed number of
rounds, so `wall_ratio` is the cost of encryption alone and `return_gap` compares final returns.
With ``--stop-on-solve`` runs end once solved (long modes): then compare `rounds_to_solve` and
`wall_per_round_ratio`. Every trained policy is also decrypted and run greedily (`greedy_return`).
`learning_curves.png` in the output directory shows every run against environment steps, beside the
scenario's published single-machine curve if `benchmarks/references/` has one (`reference` in the result).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.federation_plot import CURVES_FILE, plot_federation_curves
from benchmarks.reference import reference_summary
from coordinator.report import read_metrics
from fedhe.evaluate import evaluate_run
from fedhe.simulate import simulate
from protos.plan import resolve_plan
from protos.settings import RunSettings


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _solve_wall(rows: list[dict], solved_round: int | None) -> float | None:
    if solved_round is None:
        return None
    return round(sum(r["wall_s"] for r in rows if r["round"] <= solved_round), 2)


def run_federation_bench(
    scenario_ref: str,
    seeds: int = 5,
    participants: int | None = None,
    rounds: int | None = None,
    out_root: Path | None = None,
    on_run: Callable[[str, int, dict], None] | None = None,
    mode: str = "local-ppo",
    stop_on_solve: bool = False,
    greedy_episodes: int = 10,
    masking: str = "auto",
    rollout_upload: str = "statistics",
    server_optimizer: str = "adam",
    pipeline_rollouts: bool = False,
) -> dict:
    base = RunSettings(scenario=scenario_ref, mode=mode, num_server_rounds=rounds or 0, masking=masking,
                       rollout_upload=rollout_upload, server_optimizer=server_optimizer,
                       pipeline_rollouts=pipeline_rollouts)
    plan = resolve_plan(base)
    scenario, resolved = plan.scenario, plan.settings
    n = participants or scenario.num_participants
    total_rounds = resolved.num_server_rounds
    root = Path(out_root or tempfile.mkdtemp(prefix="fedhe-bench-federation-"))
    runs: dict[str, list[dict]] = {"encrypted": [], "plaintext": []}
    for seed in range(seeds):
        for kind in ("plaintext", "encrypted"):
            out = root / f"{kind}-seed{seed}"
            settings = replace(base, num_server_rounds=total_rounds, plaintext=kind == "plaintext", out_dir=str(out),
                               seed=seed, min_participants=n, stop_on_solve=stop_on_solve,
                               masking="off" if kind == "plaintext" else masking)
            t0 = time.perf_counter()
            summary = simulate(settings, n, node_seed=seed)  # paired and reproducible per seed
            rows = read_metrics(out)
            run = {
                "seed": seed,
                "out": str(out),
                "env_steps": sum(r.get("steps") or 0 for r in rows),
                "final_return": summary["final_return"],
                "solved": summary["solved"],
                "rounds_to_solve": summary["rounds_to_solve"],
                "wall_s": summary["wall_s"],
                "wall_to_solve_s": _solve_wall(rows, summary["rounds_to_solve"]),
                "process_wall_s": round(time.perf_counter() - t0, 2),
                "he_ms_per_round": summary["he_ms_per_round"],
                "upload_bytes_per_param": summary["upload_bytes_per_param"],
                "rounds": summary["rounds"],
                "wall_per_round_s": round(summary["wall_s"] / max(summary["rounds"], 1), 3),
                "greedy_return": (evaluate_run(out, episodes=greedy_episodes)["mean_return"]
                                  if greedy_episodes else None),
            }
            runs[kind].append(run)
            if on_run:
                on_run(kind, seed, run)

    def medians(mode: str) -> dict:
        return {
            key: _median([r[key] for r in runs[mode]])
            for key in ("final_return", "rounds_to_solve", "wall_s", "wall_to_solve_s", "process_wall_s",
                        "wall_per_round_s", "greedy_return")
        } | {
            "solved": sum(r["solved"] for r in runs[mode]),  # reached the threshold
            "reached_threshold": sum(r["rounds_to_solve"] is not None for r in runs[mode]),  # at some round
            "runs": len(runs[mode]),
        }

    enc, plain = medians("encrypted"), medians("plaintext")
    def gap(key: str) -> float | None:
        if enc[key] is None or not plain[key]:
            return None
        return (plain[key] - enc[key]) / abs(plain[key])

    result = {
        "scenario": scenario.name,
        "mode": mode,
        **({"rollout_upload": rollout_upload} if mode == "encrypted-rollouts" else {}),
        "server_optimizer": server_optimizer,
        "pipeline_rollouts": pipeline_rollouts,
        "masking": resolve_plan(replace(base, plaintext=False), n).settings.masking,
        "stop_on_solve": stop_on_solve,
        "participants": n,
        "rounds": total_rounds,
        "seeds": seeds,
        "encrypted": {"median": enc, "per_seed": runs["encrypted"]},
        "plaintext": {"median": plain, "per_seed": runs["plaintext"]},
        "wall_ratio": enc["wall_s"] / plain["wall_s"] if plain["wall_s"] else None,
        "wall_per_round_ratio": (enc["wall_per_round_s"] / plain["wall_per_round_s"]
                                 if plain["wall_per_round_s"] else None),
        "return_gap": gap("final_return"),
        "greedy_return_gap": gap("greedy_return"),
        "rounds_to_solve_ratio": (enc["rounds_to_solve"] / plain["rounds_to_solve"]
                                  if enc["rounds_to_solve"] and plain["rounds_to_solve"] else None),
        "reference": reference_summary(scenario.name, _median([r["env_steps"] for r in runs["encrypted"]])),
        "out_dir": str(root),
    }
    result["curves_png"] = str(plot_federation_curves(result, root / CURVES_FILE))
    return result

"""`fedhe bench federation`: encrypted vs plaintext federations, same protocol, several seeds.

Both modes run the identical protocol for the same fixed number of rounds (no early stop), so
`wall_ratio` is the cost of encryption alone and `return_gap` compares converged returns.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.report import read_metrics
from fedhe.simulate import simulate
from protos.settings import RunSettings
from scenarios import load_scenario


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
) -> dict:
    scenario = load_scenario(scenario_ref)
    n = participants or scenario.num_participants
    total_rounds = rounds or scenario.rounds
    root = Path(out_root or tempfile.mkdtemp(prefix="fedhe-bench-federation-"))
    runs: dict[str, list[dict]] = {"encrypted": [], "plaintext": []}
    for seed in range(seeds):
        for mode in ("plaintext", "encrypted"):
            out = root / f"{mode}-seed{seed}"
            settings = RunSettings(
                scenario=scenario_ref, num_server_rounds=total_rounds, plaintext=mode == "plaintext",
                out_dir=str(out), seed=seed, min_participants=n,
            )
            t0 = time.perf_counter()
            summary = simulate(settings, n)
            rows = read_metrics(out)
            run = {
                "seed": seed,
                "final_return": summary["final_return"],
                "solved": summary["solved"],
                "rounds_to_solve": summary["rounds_to_solve"],
                "wall_s": summary["wall_s"],
                "wall_to_solve_s": _solve_wall(rows, summary["rounds_to_solve"]),
                "process_wall_s": round(time.perf_counter() - t0, 2),
                "he_ms_per_round": summary["he_ms_per_round"],
                "upload_bytes_per_param": summary["upload_bytes_per_param"],
            }
            runs[mode].append(run)
            if on_run:
                on_run(mode, seed, run)

    def medians(mode: str) -> dict:
        return {
            key: _median([r[key] for r in runs[mode]])
            for key in ("final_return", "rounds_to_solve", "wall_s", "wall_to_solve_s", "process_wall_s")
        } | {"solved": sum(r["solved"] for r in runs[mode]), "runs": len(runs[mode])}

    enc, plain = medians("encrypted"), medians("plaintext")
    gap = None
    if enc["final_return"] is not None and plain["final_return"]:
        gap = (plain["final_return"] - enc["final_return"]) / abs(plain["final_return"])
    return {
        "scenario": scenario.name,
        "participants": n,
        "rounds": total_rounds,
        "seeds": seeds,
        "encrypted": {"median": enc, "per_seed": runs["encrypted"]},
        "plaintext": {"median": plain, "per_seed": runs["plaintext"]},
        "wall_ratio": enc["wall_s"] / plain["wall_s"] if plain["wall_s"] else None,
        "return_gap": gap,
        "out_dir": str(root),
    }

"""`fedhe robustness aggregation`: every attack x defense x seed as an encrypted simulated federation.

Rows are plain dicts (``COLUMNS`` lists the ones every row has, in table order), so other
commands can add columns (e.g. evaluation-time attacks) without touching the runner. Every cell
runs in ``OUT/cells/<attack>__<defense>__seed<k>/`` (a normal `fedhe simulate` output directory);
a cell whose ``summary.json`` exists is reused, so an interrupted grid continues where it stopped.

Baselines: for every defense and seed the grid also runs the clean federation (attack ``none``).
"% clean" and "slowdown" compare a cell with the clean run *without defense* of the same seed:
final return as a percentage of it, and rounds to solve divided by its rounds to solve.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.robust_aggregation import ROBUST_DEFENSES
from fedhe.lab.malicious import ATTACKS, party_mix_for
from fedhe.run_dir import KEYS_DIR, ensure_keys
from fedhe.simulate import simulate
from protos.settings import DEFENSES, RunSettings
from scenarios import load_scenario

COLUMNS = [
    "scenario",
    "attack",
    "defense",
    "seed",
    "participants",
    "malicious",
    "solved",
    "rounds_to_solve",
    "final_return",
    "rounds",
    "dp_epsilon",
    "masking",
    "clean_return_pct",
    "slowdown",
    "wall_s",
]
ROBUST_PROFILE = "n16k-d7"  # one level to spare for the defenses' plaintext factors (coordinator/robust_aggregation.py)


@dataclass
class GridSpec:
    scenario: str
    out: Path
    participants: int = 10
    malicious: int = 3
    attacks: list[str] = field(default_factory=lambda: ["sign-flip"])
    defenses: list[str] = field(default_factory=lambda: ["none", "median-norm"])
    seeds: int = 1
    rounds: int = 150
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    defense_bound: float = 0.0
    he_profile: str = ROBUST_PROFILE
    plaintext: bool = False
    clean: bool = True  # also run attack "none" for every defense and seed

    def validate(self) -> None:
        for a in self.attacks:
            if a != "none" and a not in ATTACKS:
                raise ValueError(f"unknown attack {a!r}; known: none, {', '.join(ATTACKS)}")
        for d in self.defenses:
            if d not in DEFENSES:
                raise ValueError(f"unknown defense {d!r}; known: {', '.join(DEFENSES)}")
        if not 0 <= self.malicious < self.participants:
            raise ValueError(f"--malicious must be in [0, participants), got {self.malicious} of {self.participants}")
        if self.seeds < 1 or self.rounds < 1:
            raise ValueError("--seeds and --rounds must be >= 1")


def grid_cells(spec: GridSpec) -> list[dict[str, Any]]:
    """(attack, defense, seed) cells; clean baselines first so later rows can refer to them."""
    attacks = list(dict.fromkeys((["none"] if spec.clean else []) + spec.attacks))
    defenses = list(dict.fromkeys(["none"] + spec.defenses)) if spec.clean else list(dict.fromkeys(spec.defenses))
    cells = []
    for seed in range(spec.seeds):
        for attack in attacks:
            for defense in defenses:
                if defense == "none" and "none" not in spec.defenses and attack != "none":
                    continue  # "none" is only added for the clean baseline
                cells.append({"attack": attack, "defense": defense, "seed": seed})
    return cells


def cell_dir(spec: GridSpec, cell: dict[str, Any]) -> Path:
    return spec.out / "cells" / f"{cell['attack']}__{cell['defense']}__seed{cell['seed']}"


def cell_settings(spec: GridSpec, cell: dict[str, Any], out: Path) -> RunSettings:
    attack, defense = cell["attack"], cell["defense"]
    malicious = 0 if attack == "none" else spec.malicious
    return RunSettings(
        scenario=spec.scenario,
        num_server_rounds=spec.rounds,
        plaintext=spec.plaintext,
        out_dir=str(out),
        seed=cell["seed"],
        stop_on_solve=True,
        min_participants=max(1, spec.participants - 1),
        he_profile=spec.he_profile,
        party_mix=json.dumps(party_mix_for(attack, malicious)),
        collusion_dir=str(out / "collusion"),
        defense=defense,
        defense_bound=spec.defense_bound,
        dp_noise_multiplier=spec.dp_noise_multiplier if defense == "dp" else 0.0,
        dp_delta=spec.dp_delta,
        # The masked-norm defenses need each update's own ciphertext, which pairwise masks take away.
        masking="off" if defense in ROBUST_DEFENSES else "auto",
    )


def run_cell(spec: GridSpec, cell: dict[str, Any], key_dir: Path | None) -> dict[str, Any]:
    out = cell_dir(spec, cell)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        if out.exists():  # an interrupted cell: start it again
            import shutil

            shutil.rmtree(out)
        summary = simulate(cell_settings(spec, cell, out), spec.participants, key_dir, node_seed=cell["seed"])
    return {
        "scenario": summary["scenario"],
        "attack": cell["attack"],
        "defense": cell["defense"],
        "seed": cell["seed"],
        "participants": spec.participants,
        "malicious": 0 if cell["attack"] == "none" else spec.malicious,
        "solved": bool(summary["solved"]),
        "rounds_to_solve": summary.get("rounds_to_solve"),
        "final_return": summary.get("final_return"),
        "rounds": summary.get("rounds"),
        "dp_epsilon": summary.get("dp_epsilon"),
        "masking": summary.get("masking", "off"),  # cells run before masking existed had none
        "wall_s": summary.get("wall_s"),
        "run_dir": str(out),
    }


def add_relative_columns(rows: list[dict[str, Any]]) -> None:
    """clean_return_pct and slowdown against the clean, undefended run of the same seed."""
    clean = {r["seed"]: r for r in rows if r["attack"] == "none" and r["defense"] == "none"}
    for row in rows:
        base = clean.get(row["seed"])
        row["clean_return_pct"] = row["slowdown"] = None
        if base is None:
            continue
        if row["final_return"] is not None and base["final_return"]:
            row["clean_return_pct"] = round(100.0 * row["final_return"] / abs(base["final_return"]), 1)
        if row["rounds_to_solve"] is not None and base["rounds_to_solve"]:
            row["slowdown"] = round(row["rounds_to_solve"] / base["rounds_to_solve"], 2)


def run_grid(spec: GridSpec, on_row: Callable[[dict[str, Any], int, int], None] | None = None) -> list[dict[str, Any]]:
    spec.validate()
    spec.out.mkdir(parents=True, exist_ok=True)
    profile = spec.he_profile or load_scenario(spec.scenario).he_profile
    key_dir = None if spec.plaintext else ensure_keys(spec.out / KEYS_DIR, profile)
    cells = grid_cells(spec)
    rows = []
    for k, cell in enumerate(cells):
        rows.append(run_cell(spec, cell, key_dir))
        if on_row:
            on_row(rows[-1], k + 1, len(cells))
    add_relative_columns(rows)
    write_outputs(spec, rows)
    return rows


# -- outputs ----------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], spec: GridSpec) -> str:
    """Per (attack, defense): median over seeds of return, % clean, rounds to solve, slowdown."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["defense"]), []).append(r)

    def med(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 2) if present else None

    mode = "plaintext baseline" if spec.plaintext else f"encrypted (CKKS, {spec.he_profile})"
    lines = [
        f"# Robustness: {rows[0]['scenario'] if rows else spec.scenario}",
        "",
        f"{spec.participants} participants, {spec.malicious} malicious (indices 0..{spec.malicious - 1}), "
        f"{spec.seeds} seed(s), at most {spec.rounds} rounds, {mode}. Medians over seeds; "
        '"solved" counts seeds. % clean and slowdown are relative to the clean run without defense '
        "(same seed). Returns are the honest participants' federation mean over the last 100 episodes. "
        "Cells with norm-bound or median-norm run with pairwise masking off: those defenses need each update's "
        "own norm.",
        "",
        "| attack | defense | solved | rounds to solve | final return | % clean | slowdown | epsilon (delta "
        f"{spec.dp_delta:g}) | masking |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (attack, defense), rs in groups.items():
        solved = sum(r["solved"] for r in rs)
        eps = med([r["dp_epsilon"] for r in rs])
        lines.append(
            f"| {attack} | {defense} | {solved}/{len(rs)} | {_fmt(med([r['rounds_to_solve'] for r in rs]))} | "
            f"{_fmt(med([r['final_return'] for r in rs]))} | {_fmt(med([r['clean_return_pct'] for r in rs]))} | "
            f"{_fmt(med([r['slowdown'] for r in rs]))} | {_fmt(eps)} | "
            f"{'/'.join(sorted({str(r.get('masking') or '-') for r in rs}))} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coordinator.report import read_metrics

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in rows:
        pts = [
            (m["round"], m["mean_return"]) for m in read_metrics(Path(r["run_dir"])) if m.get("mean_return") is not None
        ]
        if pts:
            style = "--" if r["attack"] == "none" else "-"
            ax.plot(*zip(*pts), style, label=f"{r['attack']} / {r['defense']} (seed {r['seed']})", linewidth=1.2)
    ax.set_xlabel("round")
    ax.set_ylabel("honest federation mean return")
    ax.set_title("robustness: attack / defense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(spec: GridSpec, rows: list[dict[str, Any]]) -> None:
    (spec.out / "robustness.json").write_text(json.dumps(rows, indent=2) + "\n")
    (spec.out / "robustness.md").write_text(markdown_table(rows, spec))
    plot(rows, spec.out / "robustness.png")


__all__ = ["COLUMNS", "GridSpec", "ROBUST_PROFILE", "add_relative_columns", "grid_cells", "markdown_table", "run_grid"]

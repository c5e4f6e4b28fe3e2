"""One PNG for `fedhe bench federation`: every run's learning curve against environment steps, beside the
scenario's published single-machine curve when ``references/`` has one."""

from __future__ import annotations

from pathlib import Path

from benchmarks.reference import reference_for
from coordinator.report import read_metrics, recent_mean_return

CURVES_FILE = "learning_curves.png"
COLORS = {"encrypted": "tab:blue", "plaintext": "tab:orange"}


def curve_points(run_dir: Path, episodes: int = 100) -> tuple[list[int], list[float]]:
    """Per round with released episodes: environment steps so far (all participants) and the mean return of the
    last ``episodes`` episodes, the statistic a run's ``final_return`` reports at its end."""
    rows = read_metrics(run_dir)
    steps: list[int] = []
    values: list[float] = []
    total = 0
    for i, row in enumerate(rows):
        total += row.get("steps") or 0
        if row.get("mean_return") is None:
            continue
        value = recent_mean_return(rows[: i + 1], episodes)
        if value is not None:
            steps.append(total)
            values.append(value)
    return steps, values


def plot_federation_curves(result: dict, path: Path) -> Path:
    """``result`` is what ``run_federation_bench`` returns (each run's ``out`` directory still on disk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind, color in COLORS.items():
        runs = result[kind]["per_seed"]
        for k, run in enumerate(runs):
            xs, ys = curve_points(Path(run["out"]))
            label = f"{kind} federation ({len(runs)} seed{'s' if len(runs) != 1 else ''})" if k == 0 else None
            ax.plot(xs, ys, color=color, linewidth=1.2, alpha=0.85, label=label)
    reference = reference_for(result["scenario"])
    if reference is not None:
        ax.plot(reference.steps, reference.returns, color="black", linestyle="--", label=reference.label)
        for label, steps, value, std in reference.points:
            ax.errorbar([steps], [value], yerr=[std], color="dimgray", marker="s", capsize=3, label=label)
    ax.set_xlabel("environment steps (all participants)")
    ax.set_ylabel("mean return, last 100 episodes")
    ax.set_title(f"{result['scenario']}: {result['participants']} participants, {result['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

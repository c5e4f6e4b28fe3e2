"""Run outputs: metrics.jsonl (one line per round), summary.json and learning_curve.png.

Everything here is derived from federation-level values a participant decrypted, rounded and
released, plus the coordinator's own cost measurements; nothing per participant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVE_FILE = "learning_curve.png"


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(directory: Path, row: dict[str, Any]) -> None:
    with open(Path(directory) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(directory: Path, last_round: int) -> None:
    """On resume: drop lines of rounds after the checkpoint (they will be redone)."""
    rows = [r for r in read_metrics(directory) if r["round"] <= last_round]
    path = Path(directory) / METRICS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recent_mean_return(rows: list[dict[str, Any]], episodes: int = 100) -> float | None:
    """Federation mean over (at least) the last ``episodes`` episodes, whole rounds."""
    total, count = 0.0, 0
    for row in reversed(rows):
        if row.get("mean_return") is None or not row.get("episodes"):
            continue
        total += row["mean_return"] * row["episodes"]
        count += row["episodes"]
        if count >= episodes:
            break
    return total / count if count else None


def is_solved(rows: list[dict[str, Any]], threshold: float | None, episodes: int = 100) -> bool:
    """At least ``episodes`` episodes released and their recent mean reaches the threshold."""
    if threshold is None or sum(r.get("episodes") or 0 for r in rows) < episodes:
        return False
    value = recent_mean_return(rows, episodes)
    return value is not None and value >= threshold


def rounds_to_solve(rows: list[dict[str, Any]], threshold: float | None) -> int | None:
    for i, row in enumerate(rows):
        if is_solved(rows[: i + 1], threshold):
            return row["round"]
    return None


def write_summary(
    directory: Path,
    *,
    scenario: str,
    encrypted: bool,
    participants: int,
    threshold: float | None,
    num_params: int,
    wall_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = read_metrics(directory)
    final = recent_mean_return(rows)
    up = [r["bytes_up"] / r["participants"] for r in rows if r.get("participants")]
    summary = {
        "scenario": scenario,
        "encrypted": encrypted,
        "participants": participants,
        "rounds": len(rows),
        "final_return": None if final is None else round(final, 2),
        "reward_threshold": threshold,
        "solved": is_solved(rows, threshold),  # the same predicate as --stop-on-solve, at the end
        "rounds_to_solve": rounds_to_solve(rows, threshold),
        "wall_s": round(wall_s, 2),
        "num_params": num_params,
        "upload_bytes_per_param": round(sum(up) / len(up) / num_params, 2) if up else None,
        "he_ms_per_round": round(sum(r["he_ms"] for r in rows) / len(rows), 2) if rows else None,
        **(extra or {}),
    }
    (Path(directory) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_learning_curve(directory, rows, scenario, threshold, encrypted)
    return summary


def plot_learning_curve(
    directory: Path, rows: list[dict[str, Any]], scenario: str, threshold: float | None, encrypted: bool
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["round"], r["mean_return"]) for r in rows if r.get("mean_return") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if points:
        ax.plot(*zip(*points), marker=".", label="federation mean return (released)")
    if threshold is not None:
        ax.axhline(threshold, color="tab:green", linestyle="--", label=f"solved ({threshold:g})")
    ax.set_xlabel("round")
    ax.set_ylabel("mean episode return")
    mode = "encrypted (CKKS)" if encrypted else "plaintext baseline"
    ax.set_title(f"{scenario}: {mode}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(directory) / CURVE_FILE
    fig.savefig(path)
    plt.close(fig)
    return path

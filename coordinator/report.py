"""Run outputs: metrics.jsonl (one line per round), summary.json and learning_curve.png.

Everything here is derived from federation-level values a participant decrypted, rounded and
released, plus the coordinator's own cost measurements; nothing per participant.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVE_FILE = "learning_curve.png"


@dataclass
class RunRecord:
    """What a run's rows do not hold: rounds that changed nothing, who took part, resumes, wall time.

    Checkpointed with the state (``run_record_json``), so a resumed run reports both parts."""

    failed_rounds: list[dict] = field(default_factory=list)  # {"round", "cause", "failed": [...]}
    resumed_from: list[int] = field(default_factory=list)  # the round each resume continued after
    wall_s_before: float = 0.0  # wall time of the earlier parts of a resumed run
    organizations_before: dict[str, dict] = field(default_factory=dict)  # their counts, by organization
    warned_short: bool = False  # the run was told once that fewer organizations are connected than asked
    started: float = field(default_factory=time.perf_counter)

    def start(self, resumed_from: int | None) -> None:
        self.started = time.perf_counter()
        if resumed_from is not None:
            self.resumed_from.append(resumed_from)

    def failed_round(self, outcome: Any) -> None:
        self.failed_rounds.append({"round": outcome.round, "cause": outcome.cause, "failed": outcome.failed})

    def wall_s(self) -> float:
        return self.wall_s_before + time.perf_counter() - self.started

    def organizations(self, current: Any) -> dict[str, dict]:
        """Per organization: rounds answered and failed and why, over every part of the run."""
        merged = {name: dict(entry, why=dict(entry.get("why", {})))
                  for name, entry in self.organizations_before.items()}
        for name, entry in current.summary().items():
            if name in merged:
                before = merged[name]
                entry = dict(entry, rounds_answered=entry["rounds_answered"] + before["rounds_answered"],
                             rounds_failed=entry["rounds_failed"] + before["rounds_failed"],
                             why=dict(Counter(before["why"]) + Counter(entry["why"])))
            merged[name] = entry
        return merged

    def snapshot(self, organizations: Any) -> str:
        return json.dumps({"failed_rounds": self.failed_rounds, "resumed_from": self.resumed_from,
                           "wall_s": self.wall_s(), "organizations": self.organizations(organizations)})

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text or "{}")
        return cls(failed_rounds=list(data.get("failed_rounds", [])),
                   resumed_from=list(data.get("resumed_from", [])), wall_s_before=float(data.get("wall_s", 0.0)),
                   organizations_before=dict(data.get("organizations", {})))

    def summary(self, organizations: Any) -> dict[str, Any]:
        integrity = [r["round"] for r in self.failed_rounds if r["cause"].startswith("integrity:")]
        return {"failed_rounds": self.failed_rounds, "integrity_failures": integrity,
                "resumed_from": self.resumed_from[0] if self.resumed_from else None,
                "organizations": self.organizations(organizations)}


def round_line(outcome: Any, rounds: int, rows: list[dict[str, Any]]) -> str:
    """One line per round for the ServerApp's log (``flwr log --stream``): who answered, who is missing
    and why, the time, and the latest round the integrity check confirmed, with its released return."""
    head = f"round {outcome.round}/{rounds}"
    answered = ", ".join(outcome.answered) or "none"
    missing = ", ".join(f"{f['organization']} ({f['category']})" for f in outcome.failed) or "none"
    if not outcome.completed:
        return f"{head}: changed nothing ({outcome.cause}); answered: {answered}; missing: {missing}"
    line = f"{head}: answered: {answered}; missing: {missing}; {outcome.wall_s:.1f} s"
    if rows:
        ret = rows[-1].get("mean_return")
        episodes = rows[-1].get("episodes", 0)
        shown = "no episode ended" if ret is None else f"mean return {ret:g} over {episodes} episodes"
        line += f"; round {rows[-1]['round']} confirmed: {shown}"
    return line


class TensorBoardLog:
    """TensorBoard event files in the run directory, one point per round (``tensorboard --logdir runs/``).

    The same public values as metrics.jsonl: the released return, costs and failures."""

    def __init__(self, directory: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(directory), flush_secs=5)

    def round(self, outcome: Any, row: dict[str, Any] | None) -> None:
        step, add = outcome.round, self.writer.add_scalar
        add("round/completed", float(outcome.completed), step)
        add("round/failures", float(len(outcome.failed)), step)
        add("round/answered", float(len(outcome.answered)), step)
        add("cost/wall_s", outcome.wall_s, step)
        add("cost/he_ms", outcome.he_ms, step)
        add("cost/bytes_up", float(outcome.bytes_up), step)
        add("cost/bytes_down", float(outcome.bytes_down), step)
        if outcome.completed and row is not None and row.get("mean_return") is not None:
            add("return/mean", row["mean_return"], step)
            add("return/episodes", float(row.get("episodes", 0)), step)

    def close(self) -> None:
        self.writer.close()


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
    """summary.json; ``participants``: the most that answered one round."""
    rows = read_metrics(directory)
    final = recent_mean_return(rows)
    solved_at = rounds_to_solve(rows, threshold)
    up = [r["bytes_up"] / r["participants"] for r in rows if r.get("participants")]
    summary = {
        "scenario": scenario,
        "encrypted": encrypted,
        "participants": participants,
        "rounds": len(rows),
        "final_return": None if final is None else round(final, 2),
        "reward_threshold": threshold,
        # reached the threshold (--stop-on-solve's predicate) at some round; final_return is where it ended
        "solved": solved_at is not None,
        "rounds_to_solve": solved_at,
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

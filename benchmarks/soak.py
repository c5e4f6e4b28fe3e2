"""`fedhe bench soak`: a long federation with random participant failures; memory must stay flat.

A Flower client mod makes each participant fail a round with probability ``fail_rate`` (seeded
per round and participant, as a crashed or unreachable organization would). Every round must then
either complete with the others or change nothing, the run must finish, and the coordinator's
peak memory at the last round must stay within 10% of round 20's.
"""

from __future__ import annotations

import resource
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedhe.simulate import simulate
from protos import messages
from protos.settings import RunSettings


def failure_mod(fail_rate: float, seed: int) -> Mod:
    """Fail a participant's round with probability ``fail_rate``, reproducibly."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        round_ = int(msg.content.config_records[messages.CONFIG]["round"])
        index = int(context.node_config.get("partition-id", 0))
        if np.random.default_rng([seed, round_, index]).random() < fail_rate:
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"participant {index}, round {round_}: "
                                 "injected failure (soak test)"), reply_to=msg)
        return call_next(msg, context)

    return mod


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident memory now (Linux), to tell a leak from one early peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_soak(
    rounds: int = 200, participants: int = 10, fail_rate: float = 0.1, scenario: str = "cartpole",
    plaintext: bool = False, seed: int = 0, out: Path | None = None, on_round: Callable[[int], None] | None = None,
) -> dict:
    out = Path(out or tempfile.mkdtemp(prefix="fedhe-soak-"))
    rss: dict[int, float] = {}
    now: dict[int, float] = {}

    def record(outcome, _row) -> None:
        rss[outcome.round] = peak_rss_mb()
        now[outcome.round] = current_rss_mb()
        if on_round:
            on_round(outcome.round)

    settings = RunSettings(scenario=scenario, num_server_rounds=rounds, plaintext=plaintext, out_dir=str(out),
                           seed=seed, min_participants=max(1, participants // 2), round_timeout=120.0)
    summary = simulate(settings, participants, on_round=record, client_mods=[failure_mod(fail_rate, seed)],
                       node_seed=seed)
    failed = len(summary.get("failed_rounds", []))
    early = rss.get(min(20, rounds), float("nan"))
    last = rss.get(max(rss) if rss else rounds, float("nan"))
    return {
        "rounds": rounds,
        "completed": summary["rounds"],
        "failed": failed,
        "accounted": summary["rounds"] + failed == rounds,
        "participants": participants,
        "fail_rate": fail_rate,
        "rss_mb_round_20": round(early, 1),
        "rss_mb_last": round(last, 1),
        "rss_growth": round(last / early - 1, 4) if early == early and early > 0 else None,
        "current_rss_mb_round_20": round(now.get(min(20, rounds), float("nan")), 1),
        "current_rss_mb_last": round(now.get(max(now) if now else rounds, float("nan")), 1),
        "current_rss_mb_by_round": {r: round(now[r], 1) for r in sorted(now) if r % 20 == 0},
        "final_return": summary["final_return"],
        "wall_s": summary["wall_s"],
        "out_dir": str(out),
    }

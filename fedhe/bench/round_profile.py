"""`fedhe bench round`: where an encrypted round's time goes, next to the identical plaintext round.

Two real federations on the simulation engine (encrypted, then plaintext, same seed and protocol).
The coordinator's phases come from ``metrics.jsonl`` (``phases_ms``); each participant's from its
local profile file (``FEDHE_PROFILE_DIR``), which never leaves the participant. Every number is a
median over rounds (participants: over participants and rounds); round 1 is left out (warm-up).
Per phase, ``encrypted_minus_plaintext_ms`` is what encryption costs there.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from coordinator.report import read_metrics
from fedhe.simulate import simulate
from protos.phase_timer import PROFILE_DIR_ENV
from protos.settings import RunSettings
from scenarios import resolve_run

WARMUP_ROUNDS = 1


def _phase_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Median per phase over the rows that have it (the refresh, say, is one participant's per round)."""
    names = sorted({name for row in rows for name in row})
    return {name: round(statistics.median(row[name] for row in rows if name in row), 2) for name in names}


def _participant_rows(profile_dir: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(profile_dir.glob("participant-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["round"] > WARMUP_ROUNDS:
                rows.append(record["ms"])
    return rows


def _profile_one(settings: RunSettings, participants: int, profile_dir: Path) -> dict:
    previous = os.environ.get(PROFILE_DIR_ENV)
    os.environ[PROFILE_DIR_ENV] = str(profile_dir)  # inherited by the simulation's worker processes
    try:
        simulate(settings, participants)
    finally:
        if previous is None:
            os.environ.pop(PROFILE_DIR_ENV, None)
        else:
            os.environ[PROFILE_DIR_ENV] = previous
    rows = [r for r in read_metrics(Path(settings.out_dir)) if r["round"] > WARMUP_ROUNDS]
    if not rows:
        raise RuntimeError(f"no completed round after the warm-up in {settings.out_dir}; run more --rounds")
    return {
        "rounds": len(rows),
        "wall_s_per_round": round(statistics.median(r["wall_s"] for r in rows), 3),
        "bytes_up_per_round": int(statistics.median(r["bytes_up"] for r in rows)),
        "bytes_down_per_round": int(statistics.median(r["bytes_down"] for r in rows)),
        "coordinator_ms": _phase_medians([r.get("phases_ms", {}) for r in rows]),
        "participant_ms": _phase_medians(_participant_rows(profile_dir)),
    }


def _difference(encrypted: dict[str, float], plaintext: dict[str, float]) -> dict[str, float]:
    return {name: round(ms - plaintext.get(name, 0.0), 2) for name, ms in encrypted.items()}


def run_round_profile(
    scenario_ref: str = "cartpole",
    rounds: int = 8,
    participants: int | None = None,
    seed: int = 0,
    out_root: Path | None = None,
    on_run: Callable[[str], None] | None = None,
) -> dict:
    if rounds <= WARMUP_ROUNDS:
        raise ValueError(f"--rounds must exceed the {WARMUP_ROUNDS} warm-up round(s)")
    base = RunSettings(scenario=scenario_ref, num_server_rounds=rounds, seed=seed)
    scenario, resolved = resolve_run(base)
    n = participants or scenario.num_participants
    root = Path(out_root or tempfile.mkdtemp(prefix="fedhe-bench-round-"))
    result: dict = {"scenario": scenario.name, "participants": n, "warmup_rounds": WARMUP_ROUNDS}
    for kind in ("encrypted", "plaintext"):
        settings = replace(base, plaintext=kind == "plaintext", out_dir=str(root / kind), min_participants=n,
                           masking="off" if kind == "plaintext" else base.masking)
        result[kind] = _profile_one(settings, n, root / kind / "participant-profiles")
        if on_run:
            on_run(kind)
    enc, plain = result["encrypted"], result["plaintext"]
    result["masking"] = resolve_run(replace(base, plaintext=False), n)[1].masking
    result["wall_per_round_ratio"] = round(enc["wall_s_per_round"] / plain["wall_s_per_round"], 3)
    result["encrypted_minus_plaintext_ms"] = {
        "coordinator": _difference(enc["coordinator_ms"], plain["coordinator_ms"]),
        "participant": _difference(enc["participant_ms"], plain["participant_ms"]),
    }
    result["out_dir"] = str(root)
    return result

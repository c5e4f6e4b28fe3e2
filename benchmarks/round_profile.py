"""`fedhe bench round`: where an encrypted round's time goes, next to the identical plaintext round.

Two real federations on the simulation engine (encrypted, then plaintext, same seed and protocol).
The coordinator's phases come from ``metrics.jsonl`` (``phases_ms``); each participant's from its
local profile file (``FEDHE_PROFILE_DIR``), which never leaves the participant. Every number is a
median over rounds (participants: over participants and rounds); round 1 is left out (warm-up).
Per phase, ``encrypted_minus_plaintext_ms`` is what encryption costs there.

``work_ms_per_round`` adds up the busy phases of a round: every participant's decryption,
training and encryption, the refresher's re-encryption, and the coordinator's phases except
``push`` and ``wait`` (the background checkpoint write is not counted). In simulation all of it
shares the machine's cores, so ``work_ms / cores`` is a floor under the round's wall time, and
``wall - work / cores`` is what the runtime (message passing, scheduling) adds on top.
``wall_ratio_floor`` is the ratio the encrypted protocol would reach if its work packed the cores
perfectly and the runtime added no more than in the plaintext run.

``deployed_round_estimate_s`` is the round's critical path with one machine per party, from the
same medians (``deployed_round_estimate``): the latency an organization would see, which the
simulation's wall time cannot show because it runs every party on this machine's cores.
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
from protos.plan import resolve_plan
from protos.settings import RunSettings

WARMUP_ROUNDS = 1
IDLE_PHASES = ("push", "wait")  # the coordinator waiting on the runtime and the participants
PRE_SEND_PHASES = ("messages_out",)  # the coordinator's work before the participants can start
DEFAULT_BANDWIDTH_MBPS = 1000.0  # the coordinator's link in a deployment (1 Gbit/s); 0 leaves transfer out


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


def _profile_one(settings: RunSettings, participants: int, profile_dir: Path, bandwidth_mbps: float) -> dict:
    previous = os.environ.get(PROFILE_DIR_ENV)
    os.environ[PROFILE_DIR_ENV] = str(profile_dir)  # inherited by the simulation's worker processes
    try:
        simulate(settings, participants, node_seed=settings.seed)  # both runs see the same episodes
    finally:
        if previous is None:
            os.environ.pop(PROFILE_DIR_ENV, None)
        else:
            os.environ[PROFILE_DIR_ENV] = previous
    rows = [r for r in read_metrics(Path(settings.out_dir)) if r["round"] > WARMUP_ROUNDS]
    if not rows:
        raise RuntimeError(f"no completed round after the warm-up in {settings.out_dir}; run more --rounds")
    coordinator_ms = _phase_medians([r.get("phases_ms", {}) for r in rows])
    participant_ms = _phase_medians(_participant_rows(profile_dir))
    bytes_up = int(statistics.median(r["bytes_up"] for r in rows))
    bytes_down = int(statistics.median(r["bytes_down"] for r in rows))
    deployed = deployed_round_estimate(coordinator_ms, participant_ms, bytes_up + bytes_down, bandwidth_mbps)
    return {
        "rounds": len(rows),
        "wall_s_per_round": round(statistics.median(r["wall_s"] for r in rows), 3),
        "bytes_up_per_round": bytes_up,
        "bytes_down_per_round": bytes_down,
        "coordinator_ms": coordinator_ms,
        "participant_ms": participant_ms,
        "work_ms_per_round": _work_ms(coordinator_ms, participant_ms, participants),
        "deployed_round_estimate_s": deployed.pop("total"),
        "deployed_round_parts_s": deployed,
    }


def _work_ms(coordinator_ms: dict[str, float], participant_ms: dict[str, float], participants: int) -> dict:
    """Busy time per round on each side; the refresh is one participant's, the rest everyone's."""
    everyone = sum(ms for name, ms in participant_ms.items() if name != "refresh")
    work = {
        "coordinator": round(sum(ms for name, ms in coordinator_ms.items() if name not in IDLE_PHASES), 1),
        "participants": round(participants * everyone + participant_ms.get("refresh", 0.0), 1),
    }
    work["total"] = round(work["coordinator"] + work["participants"], 1)
    return work


def deployed_round_estimate(coordinator_ms: dict[str, float], participant_ms: dict[str, float],
                            bytes_per_round: int = 0, bandwidth_mbps: float = 0.0) -> dict[str, float]:
    """A round's critical path in seconds with one machine per party, and its parts.

    In simulation the parties share one machine's cores, so its wall time mixes their work; deployed,
    the participants train in parallel, each on its own machine. The path: the coordinator's work
    before sending (``before``), then the slowest participant (``participants``: the refresher, whose
    decryption, training and encryption the others do too, plus its refresh), then the coordinator's
    work once replies are in (``after``: every other phase but ``push`` and ``wait``: reading and
    summing the replies, the refreshed state, the checkpoint snapshot, the unmask exchange with the
    key holders' answers in it, the integrity query, HE-Adam), then every message through the
    coordinator's link, one after another (``transfer``; 0 Mbit/s leaves it out).

    Left out: per-message latency and the runtime's own cost per exchange (seconds in Flower 1.41,
    docs/deployment.md "Round time"), the background checkpoint write, the refresher's integrity
    answer (no phase times it), and the overlap of the first replies' reading with the last one's
    training. Phases are wall times: in simulation, participants that outnumber the cores stretch
    each other's, and the unmask exchange holds the simulation's message passing, so those parts
    are upper bounds.
    """
    everyone = sum(ms for name, ms in participant_ms.items() if name != "refresh")
    parts_ms = {
        "before": sum(ms for name, ms in coordinator_ms.items() if name in PRE_SEND_PHASES),
        "participants": everyone + participant_ms.get("refresh", 0.0),  # the refresher's: the slowest
        "after": sum(ms for name, ms in coordinator_ms.items() if name not in IDLE_PHASES + PRE_SEND_PHASES),
        "transfer": bytes_per_round * 8 / (bandwidth_mbps * 1e3) if bandwidth_mbps > 0 else 0.0,
    }
    parts = {name: round(ms / 1e3, 3) for name, ms in parts_ms.items()}
    parts["total"] = round(sum(parts_ms.values()) / 1e3, 3)
    return parts


def _difference(encrypted: dict[str, float], plaintext: dict[str, float]) -> dict[str, float]:
    return {name: round(ms - plaintext.get(name, 0.0), 2) for name, ms in encrypted.items()}


def run_round_profile(
    scenario_ref: str = "cartpole",
    rounds: int = 8,
    participants: int | None = None,
    seed: int = 0,
    out_root: Path | None = None,
    on_run: Callable[[str], None] | None = None,
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS,
    mode: str = "local-ppo",
    rollout_upload: str = "statistics",
    pipeline_rollouts: bool = False,
) -> dict:
    if bandwidth_mbps < 0:
        raise ValueError(f"--bandwidth-mbps must be >= 0 (0: transfer left out), got {bandwidth_mbps:g}")
    if rounds <= WARMUP_ROUNDS:
        raise ValueError(f"--rounds must exceed the {WARMUP_ROUNDS} warm-up round(s)")
    base = RunSettings(scenario=scenario_ref, num_server_rounds=rounds, seed=seed, mode=mode,
                       rollout_upload=rollout_upload, pipeline_rollouts=pipeline_rollouts)
    scenario = resolve_plan(base).scenario
    n = participants or scenario.num_participants
    root = Path(out_root or tempfile.mkdtemp(prefix="fedhe-bench-round-"))
    result: dict = {"scenario": scenario.name, "mode": mode, "participants": n, "warmup_rounds": WARMUP_ROUNDS,
                    "bandwidth_mbps": bandwidth_mbps}
    if mode == "encrypted-rollouts":
        result["rollout_upload"] = rollout_upload
    result["pipeline_rollouts"] = pipeline_rollouts
    for kind in ("encrypted", "plaintext"):
        settings = replace(base, plaintext=kind == "plaintext", out_dir=str(root / kind), min_participants=n,
                           masking="off" if kind == "plaintext" else base.masking)
        result[kind] = _profile_one(settings, n, root / kind / "participant-profiles", bandwidth_mbps)
        if on_run:
            on_run(kind)
    enc, plain = result["encrypted"], result["plaintext"]
    result["masking"] = resolve_plan(replace(base, plaintext=False), n).settings.masking
    result["wall_per_round_ratio"] = round(enc["wall_s_per_round"] / plain["wall_s_per_round"], 3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runtime_s = plain["wall_s_per_round"] - plain["work_ms_per_round"]["total"] / 1e3 / cores
    floor_s = enc["work_ms_per_round"]["total"] / 1e3 / cores + max(runtime_s, 0.0)
    result.update(cores=cores, plaintext_runtime_s_per_round=round(runtime_s, 3),
                  wall_ratio_floor=round(floor_s / plain["wall_s_per_round"], 3),
                  deployed_ratio=round(enc["deployed_round_estimate_s"] / plain["deployed_round_estimate_s"], 3))
    result["encrypted_minus_plaintext_ms"] = {
        "coordinator": _difference(enc["coordinator_ms"], plain["coordinator_ms"]),
        "participant": _difference(enc["participant_ms"], plain["participant_ms"]),
    }
    result["out_dir"] = str(root)
    return result

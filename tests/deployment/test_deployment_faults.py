"""Real deployments under faults: what each party sees and what the run reports (SuperLink + SuperNodes on loopback).

Every test starts its own processes (own FLWR_HOME each, free ports, nothing read from ~/.flwr)
and, on failure, shows the tail of every process's log (``RunResult.check``, ``DeploymentError``).
One deployment per test covers several faults: starting one costs more than a round.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from support.deployment_harness import LocalDeployment
from support.federation_setup import ORGANIZATIONS, distribute_keys, node_configs, snapshot_app

from coordinator.checkpoint import CHECKPOINT_FILE
from coordinator.report import METRICS_FILE, SUMMARY_FILE
from protos.codec import parse_message
from protos.fedhe.v1 import wire_pb2

pytestmark = pytest.mark.deployment


def rows_of(out_dir: Path) -> list[dict]:
    path = out_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_config(keys, out_dir: Path, rounds: int, **extra) -> dict:
    return {"scenario": "cartpole", "num-server-rounds": rounds, "coordinator-key": str(keys.coordinator_key.resolve()),
            "out-dir": str(out_dir.resolve()), **extra}


def wait_until(condition, timeout: float, what: str, dep: LocalDeployment | None = None) -> None:
    """Poll ``condition``; on timeout fail with the tail of every process's and run's log."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "" if dep is None else dep.diagnostics() + "".join(
                f"\n--- {p} ---\n{p.read_text()[-3000:]}" for p in sorted((dep.workdir / "runs").glob("*.log")))
            raise AssertionError(f"timed out waiting for {what}{logs}")
        time.sleep(0.2)


def in_background(dep: LocalDeployment, app: Path, config: dict, timeout: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=dep.run_app(app, run_config=config,
                                                                               timeout=timeout)))
    runner.start()
    return runner, outcome


@pytest.mark.timeout(600)
def test_refusals_wrong_keys_operator_mistakes_and_a_killed_coordinator(tmp_path):
    """Four organizations; the run asks masking=off. hospital-c's policy requires masks: it refuses;
    hospital-d holds another federation's key. Both are named on both sides and left out, the other
    two train. Then operators' mistakes are refused before round 1, a run asking for more
    participants than are connected goes on with those present, and a coordinator killed mid-run
    resumes from its last confirmed round, its summary covering both parts."""
    keys = distribute_keys(tmp_path, 4)
    foreign = distribute_keys(tmp_path, 1, name="other-federation")
    configs = node_configs(keys)
    for cfg in (configs[0], configs[1], configs[3]):
        cfg["masking"] = "optional"
    configs[3].update({"key-dir": str(foreign.org_dirs[0].resolve()), "organization": "hospital-d"})
    app = snapshot_app(tmp_path)
    out = tmp_path / "run"
    with LocalDeployment(4, tmp_path / "dep", configs) as dep:
        result = dep.run_app(app, run_config=run_config(keys, out, 2, masking="off", **{"min-participants": 2}),
                             timeout=300)
        result.check()
        mistakes = dep.run_app(app, run_config=run_config(keys, tmp_path / "mistakes", "10", participants=-3),
                               timeout=120)
        misspelled = dep.run_app(
            app, run_config={**run_config(keys, tmp_path / "misspelled", 1), "num-servr-rounds": 3}, timeout=120)
        short = dep.run_app(app, run_config=run_config(keys, tmp_path / "short", 1, participants=5, masking="off",
                                                       **{"min-participants": 2, "round-timeout": 10.0}), timeout=180)
        short.check()
        resumed_out = tmp_path / "resumed"
        config = run_config(keys, resumed_out, 4, masking="off", **{"min-participants": 2})
        runner, outcome = in_background(dep, app, config, 300)
        # a confirmed round's checkpoint is written while the next round trains, after its metrics row
        wait_until(lambda: (resumed_out / CHECKPOINT_FILE).is_file(), 240, "a checkpointed round", dep)
        assert dep.kill_serverapp() >= 1
        runner.join(timeout=300)
        done = [r["round"] for r in rows_of(resumed_out)]
        checkpointed = parse_message(wire_pb2.Checkpoint, (resumed_out / CHECKPOINT_FILE).read_bytes(),
                                     max_bytes=1 << 30).round
        resumed = dep.run_app(app, run_config={**config, "resume": True}, timeout=300)
        resumed.check()

    # refusal and wrong key: named in the coordinator's log, its summary, and each organization's own log
    summary = json.loads((out / SUMMARY_FILE).read_text())
    orgs = summary["organizations"]
    assert orgs["hospital-c"]["status"] == "excluded" and orgs["hospital-c"]["why"] == {"refused": 1}
    assert orgs["hospital-d"]["status"] == "excluded" and orgs["hospital-d"]["why"] == {"wrong-key": 1}
    assert orgs["hospital-a"]["rounds_answered"] == orgs["hospital-b"]["rounds_answered"] == 2
    assert "hospital-c refuses: the run asks masking=off, this node requires pairwise" in result.output
    assert "hospital-d: wrong federation key; left out for the rest of this run" in result.output
    assert "masking=off, this node requires pairwise" in dep.supernodes[2].log_path.read_text()
    assert "replied 'hospital-d: wrong federation key'" in dep.supernodes[3].log_path.read_text()
    assert "FingerprintMismatchError" in (keys.org_dirs[3].parent / "worker" / "worker.log").read_text()
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [1, 2] and all(r["participants"] == 2 for r in rows)
    assert {f["organization"] for f in rows[0]["failed"]} == {"hospital-c", "hospital-d"}
    assert rows[1]["failed"] == []  # told once, then left out instead of being asked every round

    # operators' mistakes: one line each, a failed run, before round 1
    assert mistakes.status == "finished:failed", mistakes.describe()
    assert "run config 'num-server-rounds' must be an integer, got '10' (a string: drop the quotes)" in mistakes.output
    assert "participants must be >= 0 (0: every connected node), got -3" in mistakes.output
    assert not rows_of(tmp_path / "mistakes")
    assert misspelled.returncode != 0 and "Invalid run configuration" in misspelled.output
    assert "'num-servr-rounds' is not present" in dep.superlink.log_path.read_text()
    assert "the run asks for 5 participants, 2 organizations are connected; waiting up to 10 s" in short.output
    assert [r["participants"] for r in rows_of(tmp_path / "short")] == [2]

    # the coordinator killed mid-run: the resumed run continues from the last confirmed round
    assert outcome["result"].status != "finished:completed"
    rounds = [r["round"] for r in rows_of(resumed_out)]
    assert rounds == [1, 2, 3, 4] and done == rounds[: len(done)]  # nothing repeated
    resumed_summary = json.loads((resumed_out / SUMMARY_FILE).read_text())
    assert 1 <= checkpointed <= done[-1]  # at most the round in flight is trained again
    assert resumed_summary["resumed_from"] == checkpointed and resumed_summary["rounds"] == 4
    assert resumed_summary["wall_s"] > resumed.duration_s * 0.5  # covers the first part too


@pytest.mark.timeout(600)
def test_a_killed_supernode_is_named_costs_one_round_and_rejoins(tmp_path):
    """Four organizations with pairwise masks; hospital-d's SuperNode is killed once round 1 is confirmed.
    The round it dies in completes with the others (its self-mask rebuilt from their shares, or its pair
    masks corrected), later rounds mask over the three left without any correction exchange, and the
    restarted node (a new node id) takes its organization's place again."""
    keys = distribute_keys(tmp_path, 4)
    out = tmp_path / "run"
    config = run_config(keys, out, 8, **{"min-participants": 3, "round-timeout": 30.0})
    with LocalDeployment(4, tmp_path / "dep", node_configs(keys)) as dep:
        runner, outcome = in_background(dep, snapshot_app(tmp_path), config, 540)
        wait_until(lambda: len(rows_of(out)) >= 1, 300, "round 1 confirmed", dep)
        dep.kill_node(3)
        wait_until(lambda: len(rows_of(out)) >= 4, 400, "rounds without the dead node", dep)
        dep.restart_node(3)
        runner.join(timeout=540)
        outcome["result"].check()
    rows = rows_of(out)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    named = [r for r in rows if any(f["organization"] == "hospital-d" for f in r["failed"])]
    assert len(named) == 1, rows  # named in the round it died in, and only then
    died = named[0]
    after = [r for r in rows if r["round"] > died["round"] and "hospital-d" not in r["answered"]]
    assert after and all(r["mask_dropped"] == [] and r["participants"] == 3 for r in after)  # a dead node costs once
    assert summary["failed_rounds"] == [], summary["failed_rounds"]
    assert rows[-1]["participants"] == 4 and "hospital-d" in rows[-1]["answered"]  # back in its place
    assert set(summary["organizations"]) == set(ORGANIZATIONS[:4])
    assert summary["organizations"]["hospital-d"]["status"] == "active"
    assert summary["organizations"]["hospital-d"]["rounds_failed"] == 1
    before = [r["wall_s"] for r in rows if r["round"] < died["round"]]
    steady = [r["wall_s"] for r in after]
    print(f"round wall time: before the kill {statistics.median(before):.1f} s, the round it died in "
          f"{died['wall_s']:.1f} s, after it {statistics.median(steady):.1f} s (median)")
    assert statistics.median(steady) < died["wall_s"]

"""Real deployments under TLS, SuperNode authentication and faults (SuperLink + SuperNodes on loopback).

Every test starts its own processes (own FLWR_HOME each, free ports, nothing read from ~/.flwr)
and, on failure, shows the tail of every process's log (``RunResult.check``, ``DeploymentError``).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from support.credentials import make_auth_key, make_tls
from support.deployment_harness import LocalDeployment
from support.federation_setup import distribute_keys, node_configs, snapshot_app

from coordinator.report import METRICS_FILE, SUMMARY_FILE

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


@pytest.mark.timeout(420)
def test_tls_and_supernode_authentication(tmp_path):
    """Registered SuperNodes train over TLS; an unregistered node and a node trusting another CA are refused."""
    keys = distribute_keys(tmp_path, 3)
    tls = make_tls(tmp_path / "certs")
    other_ca = make_tls(tmp_path / "other-certs", ca_name="someone else's CA")
    out = tmp_path / "run"
    with LocalDeployment(3, tmp_path / "dep", node_configs(keys), tls=tls, auth=True) as dep:
        unregistered_key, _ = make_auth_key(tmp_path / "intruder")
        intruder = dep.spawn_node(0, auth_key=unregistered_key, name="unregistered")
        stranger = dep.spawn_node(1, root_certificates=other_ca.ca_cert, name="other-ca")
        result = dep.run_app(snapshot_app(tmp_path), run_config=run_config(keys, out, 2), timeout=300)
        result.check()
        for refused in (intruder, stranger):
            wait_until(lambda p=refused: p.popen.poll() is not None, 90, f"{refused.name} to be refused")
        assert len(dep.online_nodes()) == 3
    assert [r["round"] for r in rows_of(out)] == [1, 2]
    assert all(r["participants"] == 3 for r in rows_of(out))
    assert intruder.popen.returncode != 0 and "Failed to activate SuperNode" in intruder.tail(200)
    assert stranger.popen.returncode != 0 and "SSL/TLS handshake error" in stranger.tail(200)


@pytest.mark.timeout(480)
def test_a_supernode_killed_mid_round_is_left_out_and_rejoins(tmp_path):
    keys = distribute_keys(tmp_path, 3)
    out = tmp_path / "run"
    # 8 rounds: after the restart (at round 3 or 4) a loaded machine needs a few rounds to start the node
    config = run_config(keys, out, 8, **{"min-participants": 2, "round-timeout": 25.0})
    with LocalDeployment(3, tmp_path / "dep", node_configs(keys)) as dep:
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=dep.run_app(
            snapshot_app(tmp_path), run_config=config, timeout=420)))
        runner.start()
        wait_until(lambda: len(rows_of(out)) >= 1, 240, "round 1", dep)
        dep.kill_node(2)  # round 2 is under way
        wait_until(lambda: len(rows_of(out)) >= 3, 240, "rounds without the dead node", dep)
        dep.restart_node(2)
        runner.join(timeout=420)
        outcome["result"].check()
    rows = rows_of(out)
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert rows[0]["participants"] == 3
    assert any(r["participants"] == 2 for r in rows[1:4])  # the round it died in completed with the others
    silent = [line for r in rows for line in r["failed"]]
    # the dead node by its id, not Flower's placeholder "node 1"
    assert silent and all("participant node 1," not in line for line in silent)
    assert rows[-1]["participants"] == 3  # the restarted node takes part again


@pytest.mark.timeout(480)
def test_the_coordinator_killed_mid_run_resumes_from_the_last_completed_round(tmp_path):
    keys = distribute_keys(tmp_path, 3)
    out = tmp_path / "run"
    app = snapshot_app(tmp_path)
    with LocalDeployment(3, tmp_path / "dep", node_configs(keys)) as dep:
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=dep.run_app(
            app, run_config=run_config(keys, out, 4), timeout=300)))
        runner.start()
        wait_until(lambda: len(rows_of(out)) >= 2, 240, "two completed rounds", dep)
        assert dep.kill_serverapp() >= 1
        runner.join(timeout=300)
        assert outcome["result"].status != "finished:completed"
        done = [r["round"] for r in rows_of(out)]
        resumed = dep.run_app(app, run_config=run_config(keys, out, 4, resume=True), timeout=300)
        resumed.check()
    rounds = [r["round"] for r in rows_of(out)]
    assert rounds == [1, 2, 3, 4] and done == rounds[: len(done)]  # nothing lost, nothing repeated
    assert json.loads((out / SUMMARY_FILE).read_text())["rounds"] == 4


@pytest.mark.timeout(420)
def test_a_supernode_with_another_federations_key_is_named_and_the_others_continue(tmp_path):
    keys = distribute_keys(tmp_path, 3)
    foreign = distribute_keys(tmp_path, 1, name="other-federation")
    configs = node_configs(keys)
    configs[2]["key-dir"] = str(foreign.org_dirs[0].resolve())
    out = tmp_path / "run"
    config = run_config(keys, out, 2, **{"min-participants": 2, "round-timeout": 60.0})
    with LocalDeployment(3, tmp_path / "dep", configs) as dep:
        result = dep.run_app(snapshot_app(tmp_path), run_config=config, timeout=300)
        result.check()
    node_log = dep.supernodes[2].log_path.read_text()  # the details stay in the organization's own log
    assert "FingerprintMismatchError" in node_log and foreign.fingerprint[:12] in node_log
    rows = rows_of(out)
    assert [r["round"] for r in rows] == [1, 2] and all(r["participants"] == 2 for r in rows)
    wrong_key = [line for line in rows[0]["failed"] if "participant-2" in line]
    assert wrong_key and wrong_key[0].endswith("participant-2: wrong federation key")  # no more than that
    assert rows[1]["failed"] == []  # told once, then left out instead of being asked every round
    assert "another federation's key; left out" in result.output

"""A deployment as organizations run it trains exactly as a simulation does, and says so.

One SuperLink under TLS with SuperNode authentication and three organizations (each its own key
directory, roster entry and long-lived worker) train CartPole until it is solved. The run is
watched as an operator would: one log line per round in the streamed ServerApp log, TensorBoard
event files, a summary that names the organizations; then an organization evaluates the trained
policy with its own key. Intruders (an unregistered key, another CA) are refused meanwhile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from support.credentials import make_auth_key, make_tls
from support.deployment_harness import LocalDeployment
from support.federation_setup import ORGANIZATIONS, distribute_keys, node_configs, snapshot_app

from coordinator.checkpoint import CHECKPOINT_FILE
from coordinator.report import METRICS_FILE, SUMMARY_FILE
from coordinator.server_app import RUN_INFO_FILE

pytestmark = pytest.mark.deployment
ROUND_LINE = re.compile(r"round (\d+)/60: answered: (.+?); missing: none; [\d.]+ s")
CONFIRMED = re.compile(r"round (\d+) confirmed: mean return ([\d.]+) over \d+ episodes")


@pytest.mark.timeout(900)
def test_a_deployed_run_trains_until_solved_and_reports_it(tmp_path):
    keys = distribute_keys(tmp_path, 3)
    tls = make_tls(tmp_path / "certs")
    other_ca = make_tls(tmp_path / "other-certs", ca_name="someone else's CA")
    out = tmp_path / "coordinator" / "run"
    config = {"scenario": "cartpole", "num-server-rounds": 60, "stop-on-solve": True, "round-timeout": 120.0,
              "coordinator-key": str(keys.coordinator_key.resolve()), "out-dir": str(out.resolve())}
    with LocalDeployment(3, tmp_path / "dep", node_configs(keys), tls=tls, auth=True) as dep:
        intruder = dep.spawn_node(0, auth_key=make_auth_key(tmp_path / "intruder")[0], name="unregistered")
        stranger = dep.spawn_node(1, root_certificates=other_ca.ca_cert, name="other-ca")
        result = dep.run_app(snapshot_app(tmp_path), run_config=config, timeout=840)
        result.check()
        assert len(dep.online_nodes()) == 3
    assert intruder.popen.returncode != 0 and "Failed to activate SuperNode" in intruder.tail(200)
    assert stranger.popen.returncode != 0 and "SSL/TLS handshake error" in stranger.tail(200)

    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert summary["solved"] is True and summary["final_return"] >= 475, summary
    assert summary["rounds"] == len(rows) == rows[-1]["round"] and summary["failed_rounds"] == []
    assert set(summary["organizations"]) == set(ORGANIZATIONS[:3])
    assert all(org["rounds_answered"] == summary["rounds"] for org in summary["organizations"].values())
    # episodes continue across rounds in each organization's worker: 500-step episodes end and are
    # counted although a round collects only 256 steps per environment (restarted environments never would)
    assert rows[-1]["episodes"] > 0 and rows[-1]["mean_return"] >= 400, rows[-1]
    # watchable: one line per round as it happens, naming the organizations
    lines = ROUND_LINE.findall(result.output)
    assert [int(r) for r, _ in lines] == list(range(1, len(lines) + 1)) and len(lines) >= summary["rounds"]
    assert all(set(who.split(", ")) == set(ORGANIZATIONS[:3]) for _, who in lines)
    confirmed = CONFIRMED.findall(result.output)  # each line also gives the latest round the check confirmed
    assert [int(r) for r, _ in confirmed] == list(range(1, len(lines)))
    assert list(out.glob("events.out.tfevents.*"))  # tensorboard --logdir runs/
    assert json.loads((out / RUN_INFO_FILE).read_text())["reproducible"] is False

    # An organization evaluates the trained policy: the coordinator's checkpoint and run.json, its own key.
    evaluation = tmp_path / "hospital-a-evaluation"
    evaluation.mkdir()
    for name in (CHECKPOINT_FILE, RUN_INFO_FILE):
        (evaluation / name).write_bytes((out / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "fedhe.cli", "evaluate", str(evaluation), "--key-dir",
                           str(keys.org_dirs[0]), "--episodes", "10", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    greedy = json.loads(proc.stdout)["mean_return"]
    assert abs(greedy - summary["final_return"]) <= 0.05 * greedy, (greedy, summary["final_return"])

"""A real deployment under a fault the solved-run test cannot host: a SuperNode killed mid-run
(then the same deployment in the encrypted-rollout mode).

A masked sum needs three survivors, so this federation has four organizations (without TLS: the
solved-run test covers it; an authenticated node could not restart within Flower's 60 s). The
test starts its own processes (own FLWR_HOME, free ports, nothing read from ~/.flwr) and, on
failure, shows the tail of every process's log.
"""

from __future__ import annotations

import json
import statistics

import pytest
from support.deployment_harness import LocalDeployment
from support.federation_setup import (
    ORGANIZATIONS,
    distribute_keys,
    in_background,
    node_configs,
    rows_of,
    run_config,
    snapshot_app,
    wait_until,
)

from coordinator.report import SUMMARY_FILE

pytestmark = pytest.mark.deployment


@pytest.mark.timeout(600)
def test_a_killed_supernode_is_named_costs_one_round_and_rejoins(tmp_path):
    """Four organizations with pairwise masks (the run asks for five: it waits once, then goes on);
    hospital-d's SuperNode is killed once round 1 is confirmed.
    The round it dies in completes with the others (its self-mask rebuilt from their shares, or its pair
    masks corrected), later rounds mask over the three left without any correction exchange, and the
    restarted node (a new node id) takes its organization's place again. Then the same four learn
    from encrypted rollouts for a round (a mode without masks, which their policies allow)."""
    keys = distribute_keys(tmp_path, 4)
    out = tmp_path / "run"
    # the run asks for one participant more than there are nodes: it says so, waits once, goes on
    config = run_config(keys, out, 7, participants=5, **{"min-participants": 3, "round-timeout": 30.0})
    configs = [{**cfg, "masking": "optional"} for cfg in node_configs(keys)]
    with LocalDeployment(4, tmp_path / "dep", configs) as dep:
        app = snapshot_app(tmp_path)
        runner, outcome = in_background(dep, app, config, 540)
        wait_until(lambda: len(rows_of(out)) >= 1, 300, "round 1 confirmed", dep)
        dep.kill_node(3)
        wait_until(lambda: len(rows_of(out)) >= 3, 400, "rounds without the dead node", dep)
        dep.restart_node(3)
        runner.join(timeout=540)
        outcome["result"].check()
        rollout_dir = tmp_path / "rollout-run"
        dep.run_app(app, run_config=run_config(keys, rollout_dir, 1, mode="encrypted-rollouts"), timeout=240).check()
    rollout_rows = rows_of(rollout_dir)
    assert [r["round"] for r in rollout_rows] == [1]
    assert all(set(r["answered"]) == set(ORGANIZATIONS[:4]) for r in rollout_rows), rollout_rows
    assert json.loads((rollout_dir / SUMMARY_FILE).read_text())["mode"] == "encrypted-rollouts"
    assert outcome["result"].output.count("the run asks for 5 participants") == 1
    assert "the run asks for 5 participants, 4 organizations are connected; waiting up to 30 s" in outcome[
        "result"].output
    rows = rows_of(out)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["masking"] == "pairwise"
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

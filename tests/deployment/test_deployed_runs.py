"""A deployment as organizations run it trains exactly as a simulation does, and says so.

One SuperLink under TLS with SuperNode authentication; three organizations (each its own key
directory, roster entry and long-lived worker; hospital-a keeps its policy in a file) train
CartPole until it is solved, and two more are there to be refused: hospital-d holds another
federation's key, hospital-e's policy requires DP noise the run does not ask for. Both are named on
both sides and left out. Intruders (an unregistered key, another CA) are refused meanwhile.

The operator's side: mistakes in the run config fail before round 1 with one line each; the run is
watched as it goes (one log line per round in the streamed ServerApp log, TensorBoard event files,
a summary naming the organizations); the coordinator is killed mid-run and resumed from its last
checkpoint, and the resumed run still solves, its summary covering both parts. Then hospital-a
evaluates the trained policy with its own key. Afterwards the only secret-key files anywhere are
the organizations' own copies.

One deployment covers all of this: starting one costs more than a round.

The second test is the fault this deployment cannot host: a SuperNode killed mid-run. A masked sum
needs three survivors, so that federation has four organizations (without TLS; an authenticated
node could not restart within Flower's 60 s). Both tests live in this one file so that parallel
workers (pytest-xdist, one file per worker) run them one after the other: two deployments at once
on 2 cores slow each other threefold.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest
from support.credentials import make_auth_key, make_tls
from support.deployment_harness import LocalDeployment
from support.federation_setup import (
    KEY_SUFFIXES,
    ORGANIZATIONS,
    distribute_keys,
    in_background,
    key_files_under,
    node_configs,
    rows_of,
    run_config,
    snapshot_app,
    wait_until,
)

from coordinator.checkpoint import CHECKPOINT_FILE
from coordinator.report import SUMMARY_FILE
from coordinator.server_app import RUN_INFO_FILE
from protos.codec import parse_message
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY, inspect_key_file

pytestmark = pytest.mark.deployment
ROUND_LINE = re.compile(r"round (\d+)/60: answered: (.+?); missing: (.+?); [\d.]+ s")
CONFIRMED = re.compile(r"round (\d+)/60: .*; round (\d+) confirmed: mean return ([\d.]+) over \d+ episodes")
TRAINING = set(ORGANIZATIONS[:3])


def checkpointed_round(out_dir) -> int:
    return parse_message(wire_pb2.Checkpoint, (out_dir / CHECKPOINT_FILE).read_bytes(), max_bytes=1 << 30).round


@pytest.mark.timeout(1200)
def test_a_deployed_run_trains_until_solved_and_reports_it(tmp_path):
    keys = distribute_keys(tmp_path, 5)
    foreign = distribute_keys(tmp_path, 1, name="other-federation")
    tls = make_tls(tmp_path / "certs")
    other_ca = make_tls(tmp_path / "other-certs", ca_name="someone else's CA")
    secret_copies = sorted(tmp_path.rglob(PARTICIPANT_KEY))
    assert secret_copies == sorted(d / PARTICIPANT_KEY for d in [*keys.org_dirs, *foreign.org_dirs])
    assert sorted(p.name for p in keys.coordinator_key.parent.iterdir()) == [COORDINATOR_KEY]
    assert not inspect_key_file(keys.coordinator_key).has_secret_key

    configs = [{**cfg, "masking": "optional"} for cfg in node_configs(keys)]  # the run has no masks (below)
    policy_file = tmp_path / "hospital-a-policy.toml"  # hospital-a keeps its policy in a file
    policy_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in configs[0].items()
                                   if k != "participant-index"))
    configs[0] = {"participant-index": 0, "policy-file": str(policy_file)}
    configs[3].update({"key-dir": str(foreign.org_dirs[0].resolve()), "organization": "hospital-d"})
    configs[4]["min-dp-noise-multiplier"] = 0.5

    out = tmp_path / "coordinator" / "run"
    # masking off: one exchange per round instead of two (about 8 s instead of 14 s deployed) over the
    # ~25 rounds to solve; the killed-node test below trains with pairwise masks on a deployment
    config = run_config(keys, out, 60, masking="off", **{"stop-on-solve": True, "round-timeout": 120.0})
    # the coordinator is told about exactly one key file, and it is not a secret one
    assert [k for k, v in config.items() if str(v).endswith(KEY_SUFFIXES)] == ["coordinator-key"]
    with LocalDeployment(5, tmp_path / "dep", configs, tls=tls, auth=True) as dep:
        intruder = dep.spawn_node(0, auth_key=make_auth_key(tmp_path / "intruder")[0], name="unregistered")
        stranger = dep.spawn_node(1, root_certificates=other_ca.ca_cert, name="other-ca")
        app = snapshot_app(tmp_path)

        # operators' mistakes: one line each and a failed run, before round 1
        mistakes = dep.run_app(app, run_config=run_config(keys, tmp_path / "mistakes", "10", participants=-3),
                               timeout=120)
        misspelled = dep.run_app(
            app, run_config={**run_config(keys, tmp_path / "misspelled", 1), "num-servr-rounds": 3}, timeout=120)

        # the run, killed once a few rounds are checkpointed, then resumed until solved
        runner, first = in_background(dep, app, config, 600)
        wait_until(lambda: (out / CHECKPOINT_FILE).is_file() and checkpointed_round(out) >= 3, 400,
                   "three checkpointed rounds", dep)
        assert dep.kill_serverapp() >= 1
        killed_at = [r["round"] for r in rows_of(out)]
        checkpointed = checkpointed_round(out)
        # resumed at once: the killed run's `flwr run` ends only when the SuperLink gives up on it
        result = dep.run_app(app, run_config={**config, "resume": True}, timeout=840)
        result.check()
        assert len(dep.online_nodes()) == 5
        runner.join(timeout=300)
    assert intruder.popen.returncode != 0 and "Failed to activate SuperNode" in intruder.tail(200)
    assert stranger.popen.returncode != 0 and "SSL/TLS handshake error" in stranger.tail(200)

    # operators' mistakes
    assert mistakes.status == "finished:failed", mistakes.describe()
    assert "run config 'num-server-rounds' must be an integer, got '10' (a string: drop the quotes)" in mistakes.output
    assert "participants must be >= 0 (0: every connected node), got -3" in mistakes.output
    assert not rows_of(tmp_path / "mistakes")
    assert misspelled.returncode != 0 and "Invalid run configuration" in misspelled.output
    assert "'num-servr-rounds' is not present" in dep.superlink.log_path.read_text()

    # the refused and the wrong key: named in the coordinator's log, its summary and each one's own log
    first_log = first["result"].output
    assert "hospital-d: wrong federation key; left out for the rest of this run" in first_log
    assert "hospital-e refuses: the run asks dp-noise-multiplier=0" in first_log
    assert "replied 'hospital-d: wrong federation key'" in dep.supernodes[3].log_path.read_text()
    assert "FingerprintMismatchError" in (keys.org_dirs[3].parent / "worker" / "worker.log").read_text()
    assert "hospital-e refuses" in dep.supernodes[4].log_path.read_text()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    orgs = summary["organizations"]
    assert orgs["hospital-d"]["status"] == "excluded" and set(orgs["hospital-d"]["why"]) == {"wrong-key"}
    assert orgs["hospital-e"]["status"] == "excluded" and set(orgs["hospital-e"]["why"]) == {"refused"}
    assert all(orgs[name]["status"] == "active" and orgs[name]["rounds_failed"] == 0 for name in TRAINING)
    assert all(orgs[name]["rounds_answered"] == summary["rounds"] for name in TRAINING)  # the retrained round once

    # killed and resumed: nothing repeated, at most the round in flight trained again
    rows = rows_of(out)
    assert first["result"].status != "finished:completed"
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1)) and killed_at == [r["round"] for r in rows][
        : len(killed_at)]
    assert 3 <= checkpointed <= killed_at[-1]
    assert summary["resumed_from"] == checkpointed
    assert summary["wall_s"] > sum(r["wall_s"] for r in rows) * 0.9  # covers both parts

    # solved, and reported so
    assert summary["solved"] is True and summary["final_return"] >= 475, summary
    assert summary["rounds"] == len(rows) == rows[-1]["round"] and summary["failed_rounds"] == []
    assert all(set(r["answered"]) == TRAINING for r in rows)
    # episodes continue across rounds in each organization's worker: 500-step episodes end and are
    # counted although a round collects only 256 steps per environment (restarted environments never would)
    assert rows[-1]["episodes"] > 0 and rows[-1]["mean_return"] >= 400, rows[-1]
    # watchable: one line per round as it happens, naming the organizations
    lines = ROUND_LINE.findall(result.output)
    assert [int(r) for r, _, _ in lines] == list(range(checkpointed + 1, rows[-1]["round"] + 1))
    assert all(set(who.split(", ")) == TRAINING for _, who, _ in lines)
    confirmed = CONFIRMED.findall(result.output)  # each line also gives the latest round the check confirmed
    assert confirmed and all(int(r) == int(c) + 1 for r, c, _ in confirmed)
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

    assert summary["masking"] == "off"

    # after every run the only secret keys are the organizations' own copies; the coordinator's side,
    # the SuperLink (its home holds the unpacked app) and every unpacked app hold no key file at all
    assert sorted(tmp_path.rglob(PARTICIPANT_KEY)) == secret_copies
    assert key_files_under(tmp_path / "dep" / "superlink") == []
    assert key_files_under(keys.coordinator_key.parent.parent) == [keys.coordinator_key]
    unpacked = [p for p in (tmp_path / "dep").glob("*/home/apps/*") if p.is_dir()]
    assert len({p.relative_to(tmp_path / "dep").parts[0] for p in unpacked}) == 1 + 5, unpacked
    assert all(key_files_under(app_copy) == [] for app_copy in unpacked)


@pytest.mark.timeout(600)
def test_a_killed_supernode_is_named_costs_one_round_and_rejoins(tmp_path):
    """Four organizations with pairwise masks (the run asks for five: it waits once, then goes on);
    hospital-d's SuperNode is killed once round 1 is confirmed.
    The round it dies in completes with the others (its self-mask rebuilt from their shares, or its pair
    masks corrected), later rounds mask over the three left without any correction exchange, and the
    restarted node (a new node id) takes its organization's place again."""
    keys = distribute_keys(tmp_path, 4)
    out = tmp_path / "run"
    # the run asks for one participant more than there are nodes: it says so, waits once, goes on
    config = run_config(keys, out, 7, participants=5, **{"min-participants": 3, "round-timeout": 30.0})
    with LocalDeployment(4, tmp_path / "dep", node_configs(keys)) as dep:
        app = snapshot_app(tmp_path)
        runner, outcome = in_background(dep, app, config, 540)
        wait_until(lambda: len(rows_of(out)) >= 1, 300, "round 1 confirmed", dep)
        dep.kill_node(3)
        wait_until(lambda: len(rows_of(out)) >= 3, 400, "rounds without the dead node", dep)
        dep.restart_node(3)
        runner.join(timeout=540)
        outcome["result"].check()
    assert outcome["result"].output.count("the run asks for 5 participants") == 1
    output = outcome["result"].output
    assert "the run asks for 5 participants, 4 organizations are available" in output
    assert "waiting up to 30 s" in output
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

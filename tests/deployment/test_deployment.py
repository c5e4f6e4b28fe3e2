"""The repo's Flower App on a real deployment: one SuperLink + 3 SuperNodes as separate processes.

Mirrors how separate organizations deploy fedhe-rl (docs/deployment.md):

* one key ceremony; afterwards each organization's SuperNode has its OWN copy of a directory
  holding only ``participant.ctx`` (node config ``key-dir``, ``participant-index``), and the
  coordinator gets only ``coordinator.ctx`` (run config ``coordinator-key``) in another
  directory. The ceremony directory is deleted before anything starts, so the only secret-key
  files on disk are the three nodes' copies.
* the app is shipped as a FAB built by ``flwr run`` from the repo root; the ServerApp runs on
  the SuperLink host, each ClientApp on its SuperNode.

See docs/testing.md ("The deployment harness") for how Flower 1.41 deployments behave (and cost) here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.deployment_harness import LocalDeployment, build_fab
from support.federation_setup import REPO_ROOT, distribute_keys, shipped_files, snapshot_app

from coordinator.checkpoint import CHECKPOINT_FILE
from coordinator.report import CURVE_FILE, METRICS_FILE, SUMMARY_FILE
from participant.keyholder import generate_keys
from participant.roster import ROSTER_FILE
from participant.sealing import create_recipient, seal_file
from protos.codec import parse_message
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY, inspect_key_file

pytestmark = pytest.mark.deployment

NUM_NODES = 3
ROUNDS = 2
KEY_SUFFIXES = (".ctx", ".pem", ".key", ".x25519", ".x25519.pub", ".sealed")
FAB_MAX_BYTES = 10 * 1024 * 1024  # Flower's FAB limit
# Node 2 also exercises the optional `env-variant` node config (a built-in CartPole variant).
ENV_VARIANTS = {2: "short-pole"}


def key_files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(KEY_SUFFIXES))


@pytest.fixture
def federation_keys(tmp_path: Path):
    """Key ceremony, then distribution as separate organizations would have it."""
    keys = distribute_keys(tmp_path, NUM_NODES)
    return keys.fingerprint, keys.org_dirs, keys.coordinator_key


@pytest.mark.timeout(540)
def test_encrypted_federation_on_real_superlink_and_supernodes(tmp_path, federation_keys):
    """Both training modes on one deployment: local PPO, then encrypted rollouts (2 rounds each)."""
    fingerprint, org_dirs, coordinator_key = federation_keys
    out_dir = tmp_path / "coordinator" / "run"
    app_dir = snapshot_app(tmp_path)

    # Key distribution: secret key only in the organizations' dirs, nothing else there;
    # the coordinator's dir holds one evaluation-only key file.
    assert sorted(p.name for p in coordinator_key.parent.iterdir()) == [COORDINATOR_KEY]
    coord_info = inspect_key_file(coordinator_key)
    assert not coord_info.has_secret_key and coord_info.fingerprint == fingerprint
    for d in org_dirs:  # the secret key, the roster and this organization's own X25519 pair
        own = [PARTICIPANT_KEY, ROSTER_FILE, "org.x25519", "org.x25519.pub"]
        assert sorted(p.name for p in d.iterdir()) == sorted(own)
        assert inspect_key_file(d / PARTICIPANT_KEY).has_secret_key
    secret_copies = sorted(tmp_path.rglob(PARTICIPANT_KEY))
    assert secret_copies == sorted(d / PARTICIPANT_KEY for d in org_dirs)

    # Each organization's own policy; masking optional: the encrypted-rollout run has no pairwise masks (the
    # default policy requires them). Organization 0 keeps its policy in a file, the others in the node config.
    policy_file = tmp_path / "org-0-policy.toml"
    policy_file.write_text(f'organization = "hospital-a"\nkey-dir = "{org_dirs[0].resolve()}"\nmasking = "optional"\n')
    node_configs = [{"participant-index": 0, "policy-file": str(policy_file)}]
    for i, d in enumerate(org_dirs[1:], start=1):
        cfg = {"key-dir": str(d.resolve()), "participant-index": i, "masking": "optional"}
        if i in ENV_VARIANTS:
            cfg["env-variant"] = ENV_VARIANTS[i]
        node_configs.append(cfg)
    run_config = {
        "scenario": "cartpole",
        "num-server-rounds": ROUNDS,
        "coordinator-key": str(coordinator_key.resolve()),
        "out-dir": str(out_dir.resolve()),
        "round-timeout": 120.0,
    }
    # The coordinator is told about exactly one key file, and it is not a secret one.
    assert [k for k, v in run_config.items() if str(v).endswith(KEY_SUFFIXES)] == ["coordinator-key"]

    deployment_dir = tmp_path / "dep"
    with LocalDeployment(
        num_nodes=NUM_NODES, node_configs=node_configs, workdir=deployment_dir
    ) as dep:
        result = dep.run_app(app_dir, run_config=run_config, timeout=240)
        result.check()  # on failure: status details + tails of every process log
        rollout_dir = tmp_path / "coordinator" / "rollout-run"
        rollouts = dep.run_app(
            app_dir, run_config={**run_config, "mode": "encrypted-rollouts", "out-dir": str(rollout_dir.resolve())},
            timeout=240,
        )
        rollouts.check()
    assert all(p.popen.poll() is not None for p in dep.processes)
    rollout_rows = [json.loads(line) for line in (rollout_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rollout_rows] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == NUM_NODES and r["failed"] == [] for r in rollout_rows), rollout_rows
    assert json.loads((rollout_dir / SUMMARY_FILE).read_text())["mode"] == "encrypted-rollouts"

    assert result.returncode == 0
    assert result.status == "finished:completed", result.describe()
    assert isinstance(result.run_id, int)

    # metrics.jsonl: one released row per round, every participant's update in each.
    rows = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    for row in rows:
        assert row["participants"] == NUM_NODES, row
        assert isinstance(row["mean_return"], float) and row["mean_return"] > 0, row
        assert row["episodes"] > 0 and row["steps"] > 0, row
        assert row["bytes_up"] > 0, row

    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    assert summary["encrypted"] is True and summary["masking"] == "pairwise"
    assert summary["rounds"] == ROUNDS
    assert summary["scenario"] == "cartpole"
    assert summary["participants"] == NUM_NODES

    checkpoint = out_dir / CHECKPOINT_FILE
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0
    assert (out_dir / CURVE_FILE).is_file()
    ckpt = parse_message(wire_pb2.Checkpoint, checkpoint.read_bytes(), max_bytes=1 << 34)
    assert ckpt.round == ROUNDS
    assert ckpt.key_fingerprint == fingerprint  # the coordinator used the federation's key
    assert ckpt.scenario == "cartpole"

    # The ServerApp never had a secret key: after the run there are still exactly the three
    # organizations' copies of participant.ctx, none under the SuperLink's cwd/FLWR_HOME (incl.
    # the FAB unpacked there) or in the coordinator's directories, whose only key file is the
    # evaluation-only coordinator.ctx.
    assert sorted(tmp_path.rglob(PARTICIPANT_KEY)) == secret_copies
    assert key_files_under(deployment_dir / "superlink") == []
    assert key_files_under(coordinator_key.parent.parent) == [coordinator_key]
    assert not inspect_key_file(coordinator_key).has_secret_key
    # ...and the FAB every node received carried no key files either.
    unpacked = [p for p in deployment_dir.glob("*/home/apps/*") if p.is_dir()]
    homes = {p.relative_to(deployment_dir).parts[0] for p in unpacked}
    assert len(homes) == 1 + NUM_NODES, unpacked  # SuperLink + each SuperNode (one copy per FAB version)
    for app_copy in unpacked:
        assert key_files_under(app_copy) == []


@pytest.mark.parametrize("gitignore", [True, False], ids=["with-gitignore", "without-gitignore"])
def test_fab_from_repo_has_no_key_files_even_with_keys_in_app_dir(tmp_path, gitignore):
    """Without ``.gitignore`` (which lists ``*.ctx``), Flower's include list alone keeps keys out."""
    repo_fab = build_fab(REPO_ROOT, tmp_path / "fab-repo")
    repo_files = shipped_files(repo_fab)
    assert repo_fab.stat().st_size < FAB_MAX_BYTES
    for component in ("coordinator/server_app.py", "participant/client_app.py", "pyproject.toml"):
        assert component in repo_files
    assert not [f for f in repo_files if f.endswith(KEY_SUFFIXES)], repo_files

    # A copy of the app dir (not the repo itself) with key material where people leave it.
    app = tmp_path / "fedhe-rl"
    shutil.copytree(
        REPO_ROOT, app,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info",
            "runs", "fedhe-run", "build",  # run outputs (may hold keys/) are re-created below
        ),
    )
    if not gitignore:
        (app / ".gitignore").unlink(missing_ok=True)
    key_dirs = [app / "keys", app / "participant" / "org-keys", app / "runs" / "quickstart" / "keys"]
    for d in key_dirs:
        generate_keys(d, "n8k-d2")  # cheap profile; real key files
        create_recipient(d / "org")  # an organization's X25519 key pair ...
        seal_file(d / "participant.ctx", d / "org.x25519.pub", d / "org.sealed")  # ... and a sealed key
    tls = app / "certificates"
    tls.mkdir()
    for name in ("ca.pem", "server.pem", "server.key", "ca.key"):
        (tls / name).write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    assert len(key_files_under(app)) == 5 * len(key_dirs) + 4

    fab = build_fab(app, tmp_path / "fab-copy")
    files = shipped_files(fab)
    assert not [f for f in files if f.endswith(KEY_SUFFIXES)], files
    key_prefixes = tuple(str(d.relative_to(app)) + "/" for d in [*key_dirs, tls])
    assert not [f for f in files if f.startswith(key_prefixes)], files
    # The key directories added nothing: the copy ships a subset of what the repo ships.
    assert set(files) <= set(repo_files), sorted(set(files) - set(repo_files))
    assert fab.stat().st_size < FAB_MAX_BYTES

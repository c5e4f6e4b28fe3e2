"""What every deployment test needs: keys as separate organizations hold them, and the app."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.report import METRICS_FILE
from participant.keyholder import generate_keys
from participant.roster import ROSTER_FILE, build_roster
from participant.sealing import create_recipient
from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY
from support.deployment_harness import LocalDeployment, build_fab, fab_files

REPO_ROOT = Path(__file__).resolve().parents[2]
ORGANIZATIONS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")
KEY_SUFFIXES = (".ctx", ".pem", ".key", ".x25519", ".x25519.pub", ".sealed")  # secret or key material


def key_files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(KEY_SUFFIXES))


@dataclass(frozen=True)
class FederationKeys:
    fingerprint: str
    org_dirs: list[Path]  # one key directory per organization, holding only participant.ctx
    coordinator_key: Path  # evaluation keys only


def distribute_keys(root: Path, organizations: int, name: str = "ceremony") -> FederationKeys:
    """The key ceremony as organizations run it: each makes its X25519 pair (`fedhe keys recipient`),
    the ceremony builds the roster from the public keys, and every organization receives the
    secret key and the roster; no other copy of the secret key remains."""
    ceremony = generate_keys(root / name)  # default profile (HE-Adam capable)
    org_dirs = [root / f"{name}-org-{i}" / "keys" for i in range(organizations)]
    publics = []
    for d in org_dirs:
        d.mkdir(parents=True)
        publics.append(create_recipient(d / "org")[1])  # org.x25519 stays here; its .pub goes to the ceremony
    roster = build_roster(ceremony.fingerprint, publics, ORGANIZATIONS[:organizations])
    for d in org_dirs:
        shutil.copy2(ceremony.participant_key, d / PARTICIPANT_KEY)
        roster.write(d / ROSTER_FILE)
    coord_dir = root / f"{name}-coordinator" / "keys"
    coord_dir.mkdir(parents=True)
    shutil.copy2(ceremony.coordinator_key, coord_dir / COORDINATOR_KEY)
    shutil.rmtree(ceremony.directory)  # no other copy of the secret key remains
    return FederationKeys(ceremony.fingerprint, org_dirs, coord_dir / COORDINATOR_KEY)


def shipped_files(fab: Path) -> list[str]:
    """FAB members without Flower's own manifest."""
    return [f for f in fab_files(fab) if f != ".info/CONTENT"]


def snapshot_app(dest: Path) -> Path:
    """A copy of exactly the files the repository's FAB ships, in ``dest/fedhe-rl``: a valid app
    name whatever the checkout is called, and immune to edits of the checkout during the test."""
    fab = build_fab(REPO_ROOT, dest / "fab")
    app = dest / "fedhe-rl"
    for rel in shipped_files(fab):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, app / rel)
    return app


def node_configs(keys: FederationKeys) -> list[dict]:
    """Each organization's node config; its worker's state directory sits next to its keys."""
    return [{"key-dir": str(d.resolve()), "participant-index": i, "state-dir": str(d.parent.resolve() / "worker")}
            for i, d in enumerate(keys.org_dirs)]


def run_config(keys: FederationKeys, out_dir: Path, rounds: int | str, **extra) -> dict:
    """A CartPole run's config as the coordinator's operator writes it (``extra``: more keys)."""
    return {"scenario": "cartpole", "num-server-rounds": rounds, "coordinator-key": str(keys.coordinator_key.resolve()),
            "out-dir": str(out_dir.resolve()), **extra}


def rows_of(out_dir: Path) -> list[dict]:
    """A run's metrics rows so far (confirmed rounds)."""
    path = out_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


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
    """Start ``flwr run`` in a thread; ``outcome["result"]`` holds its RunResult once joined."""
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=dep.run_app(app, run_config=config,
                                                                               timeout=timeout)))
    runner.start()
    return runner, outcome

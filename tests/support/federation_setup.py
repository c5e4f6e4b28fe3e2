"""What every deployment test needs: keys as separate organizations hold them, and the app."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from participant.keyholder import generate_keys
from participant.roster import ROSTER_FILE, build_roster
from participant.sealing import create_recipient
from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY
from support.deployment_harness import build_fab, fab_files

REPO_ROOT = Path(__file__).resolve().parents[2]
ORGANIZATIONS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")


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

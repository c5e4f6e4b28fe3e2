"""An owner's own CKKS key pair, for transition uploads (docs/encrypted-rollouts.md, "Per-owner keys").

With ``rollout-upload transitions`` an owner encrypts its observations, deltas and tiled theta under
a key pair of its own, not the federation's: no key holder of the federation key can read them,
alone or together with the coordinator. The coordinator computes the owner's gradient terms with
the owner's evaluation keys (public and relinearization, nothing that decrypts) and sends them
back to this owner only, who turns them into an ordinary update under the federation key.

Files: an organization's key directory holds ``owner.ctx`` (its secret key, mode 0600; it never
leaves the node) and ``owner-eval.ctx``, which the organization gives to the coordinator; the
coordinator keeps it as ``owners/<organization>.ctx`` next to ``coordinator.ctx``, so each key is
registered under the organization name the roster gives that node. `fedhe simulate` keeps one
pair per simulated organization under ``organizations/`` and registers it itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from participant.keyholder import TensealKeyHolder, load_keyholder, write_key_pair
from participant.roster import SIMULATED_DIR
from protos.errors import KeyFileError
from protos.keyfile import inspect_key_file
from protos.profiles import get_profile

OWNER_KEY = "owner.ctx"  # this organization's own secret key, in its key directory
OWNER_EVALUATION_KEY = "owner-eval.ctx"  # its evaluation keys: what the coordinator gets
OWNERS_DIR = "owners"  # next to coordinator.ctx: one registered evaluation key per organization


def create_owner_key(key_dir: Path, profile_name: str, prefix: str = "owner") -> tuple[Path, Path, str]:
    """``PREFIX.ctx`` (secret) and ``PREFIX-eval.ctx`` in ``key_dir``; refuses to overwrite a key."""
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    secret, evaluation = key_dir / f"{prefix}.ctx", key_dir / f"{prefix}-eval.ctx"
    if secret.exists():
        raise KeyFileError(f"{secret} exists; refusing to overwrite an owner key")
    fingerprint = write_key_pair(secret, evaluation, get_profile(profile_name))
    return secret, evaluation, fingerprint


def owner_key_path(key_dir: Path, index: int) -> Path:
    """``owner.ctx`` in a deployed organization's key directory, else the simulated organization's."""
    key_dir = Path(key_dir)
    simulated = key_dir / SIMULATED_DIR / f"participant-{index}.owner.ctx"
    return key_dir / OWNER_KEY if (key_dir / OWNER_KEY).is_file() or not simulated.is_file() else simulated


def load_owner_key(key_dir: Path, index: int, profile_name: str) -> TensealKeyHolder:
    """This owner's key holder; a missing key or another profile than the federation's is a clear error."""
    path = owner_key_path(key_dir, index)
    if not path.is_file():
        raise KeyFileError(
            f"transition uploads need this organization's own key and {path} does not exist: run "
            f"`fedhe keys owner --key-dir {key_dir}` and give owner-eval.ctx to the coordinator"
        )
    holder = load_keyholder(path)
    if holder.profile.name != profile_name:
        raise KeyFileError(f"{path} uses HE profile {holder.profile.name}, the federation uses {profile_name}")
    return holder


def simulated_owner_keys(key_dir: Path, names: tuple[str, ...], profile_name: str) -> None:
    """`fedhe simulate`: a key pair per simulated organization, registered as the coordinator keeps it."""
    key_dir = Path(key_dir)
    for index, name in enumerate(names):
        registered = key_dir / OWNERS_DIR / f"{name}.ctx"
        secret = key_dir / SIMULATED_DIR / f"participant-{index}.owner.ctx"
        if secret.is_file() and registered.is_file():
            if inspect_key_file(secret).fingerprint == inspect_key_file(registered).fingerprint:
                continue
        secret.unlink(missing_ok=True)
        _, evaluation, _ = create_owner_key(key_dir / SIMULATED_DIR, profile_name, f"participant-{index}.owner")
        registered.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(evaluation, registered)

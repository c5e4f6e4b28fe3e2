"""`fedhe keygen` and `fedhe keys ...`: the key ceremony and sealed key files."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedhe.console import PROFILE_HELP, console, fail
from protos.errors import WireError
from protos.profiles import DEFAULT_PROFILE

keys_app = typer.Typer(help="Inspect federation key files and seal them for organizations.", no_args_is_help=True)


def keygen(
    out: Path = typer.Option(..., "--out", help="Directory for participant.ctx, coordinator.ctx, fingerprint.txt."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    simulated_organizations: int = typer.Option(
        0,
        "--simulated-organizations",
        help=(
            "Also create N organizations' X25519 key pairs (DIR/organizations/) and their roster, for a "
            "simulation on one machine (`flwr run` with participant-key-dir=DIR) with pairwise masking."
        ),
    ),
    owner_keys: bool = typer.Option(
        False,
        "--owner-keys",
        help=(
            "With --simulated-organizations: also each organization's own CKKS key pair, registered for the "
            "coordinator (DIR/owners/), for encrypted-rollout runs with rollout-upload transitions."
        ),
    ),
) -> None:
    """Create a federation key (the key ceremony).

    participant.ctx holds the SECRET key (mode 0600): copy it to every participant out of band.
    coordinator.ctx holds only evaluation keys (public + relinearization): give it to the
    coordinator. Both carry the fingerprint in fingerprint.txt; every message is checked
    against it. For pairwise masking, build the roster next (`fedhe keys roster`); for transition
    uploads, each organization makes its own key pair on its node (`fedhe keys owner`).
    """
    from participant.keyholder import generate_keys
    from participant.owner_key import simulated_owner_keys
    from participant.roster import simulated_organizations as create_organizations

    try:
        keys = generate_keys(out, profile)
        roster = None
        if simulated_organizations > 0:
            roster = create_organizations(out, keys.fingerprint, simulated_organizations)
            if owner_keys:
                simulated_owner_keys(out, roster.names, keys.profile.name)
    except (WireError, ValueError) as exc:
        fail(str(exc))
    console.print(f"federation key [bold]{keys.fingerprint}[/] (profile {keys.profile.name})")
    console.print(f"  secret, for participants : {keys.participant_key}")
    console.print(f"  evaluation, coordinator  : {keys.coordinator_key}")
    if roster is not None:
        console.print(f"  roster of {roster.size} simulated organizations (digest {roster.digest}): {out}")
        if owner_keys:
            console.print(f"  their own keys for transition uploads, registered for the coordinator: {out}/owners")


@keys_app.command("inspect")
def keys_inspect(
    file: Path = typer.Argument(..., help="A participant.ctx, coordinator.ctx or roster.json file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a key file's profile, fingerprint, whether it holds a secret key, and its size (or a roster's digest)."""
    from participant.roster import read_roster
    from protos.keyfile import inspect_key_file

    try:
        if file.suffix == ".json":
            roster = read_roster(file)
            data = {"file": str(file), "fingerprint": roster.fingerprint, "participants": roster.size,
                    "roster_digest": roster.digest}
        else:
            info = inspect_key_file(file)
            data = {
                "file": str(info.path),
                "profile": info.profile.name,
                "fingerprint": info.fingerprint,
                "secret_key": info.has_secret_key,
                "relin_keys": info.has_relin_keys,
                "size_bytes": info.size_bytes,
                "security_bits": info.profile.security_bits,
            }
    except WireError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=str(file), show_header=False)
    for key, value in data.items():
        table.add_row(key, str(value))
    Console().print(table)


@keys_app.command("recipient")
def keys_recipient(
    out: Path = typer.Option(
        ..., "--out", help="Path prefix: writes PREFIX.x25519 (private, 0600) and PREFIX.x25519.pub."
    ),
) -> None:
    """Create this organization's X25519 key pair for receiving sealed key files.

    Send PREFIX.x25519.pub to whoever runs the key ceremony; keep PREFIX.x25519 private.
    """
    from participant.sealing import create_recipient

    try:
        private, public = create_recipient(out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"private: {private}\npublic (share this): {public}")


@keys_app.command("owner")
def keys_owner(
    key_dir: Path = typer.Option(
        ..., "--key-dir", help="This organization's key directory (holding participant.ctx): the key goes there."),
) -> None:
    """Create this organization's own CKKS key pair, for encrypted-rollout runs with transition uploads.

    Run it on the organization's own node. owner.ctx (SECRET, 0600) stays in KEY_DIR; give
    owner-eval.ctx (evaluation keys only) to the coordinator's operator, who stores it as
    owners/<organization>.ctx next to coordinator.ctx. Rollouts then leave this node under this key:
    no other party, key holders of the federation key included, can decrypt them.
    """
    from participant.owner_key import create_owner_key
    from protos.keyfile import PARTICIPANT_KEY, inspect_key_file

    try:
        profile = inspect_key_file(key_dir / PARTICIPANT_KEY).profile.name
        secret, evaluation, fingerprint = create_owner_key(key_dir, profile)
    except WireError as exc:
        fail(str(exc))
    console.print(f"owner key [bold]{fingerprint}[/] (profile {profile})")
    console.print(f"  secret, stays here     : {secret}")
    console.print(f"  evaluation, to register: {evaluation} -> the coordinator's owners/<organization>.ctx")


@keys_app.command("roster")
def keys_roster(
    public_keys: list[Path] = typer.Argument(
        ..., help="The organizations' PREFIX.x25519.pub files in participant-index order: the first is index 0."
    ),
    key_dir: Path = typer.Option(
        ..., "--key-dir", help="The ceremony's key directory (participant.ctx or coordinator.ctx): the federation."
    ),
    out: Path | None = typer.Option(None, "--out", help="Where to write the roster (default: KEY_DIR/roster.json)."),
    names: list[str] = typer.Option(
        [], "--name", help="Organization names, once per public key in the same order (default: each file's "
        "name without .x25519.pub); they appear in every log line, failure and summary."
    ),
) -> None:
    """Build the roster pairwise masking needs: participant index -> organization name and X25519 key.

    Use the same public keys the organizations sent for sealing (`fedhe keys recipient`). Send the
    roster to every organization with participant.ctx (it is public; seal it or compare the
    printed digest over a second channel); each puts it in its key directory next to its own
    private key as org.x25519 (`fedhe keys recipient --out KEYDIR/org` creates it there). The
    coordinator does not need it.
    """
    from participant.roster import ROSTER_FILE, build_roster
    from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY, inspect_key_file

    target = out or key_dir / ROSTER_FILE
    if target.exists():
        fail(f"{target} exists; a federation keeps one roster (remove it to build another)")
    key_file = key_dir / PARTICIPANT_KEY if (key_dir / PARTICIPANT_KEY).is_file() else key_dir / COORDINATOR_KEY
    try:
        roster = build_roster(inspect_key_file(key_file).fingerprint, public_keys, names)
        roster.write(target)
    except (WireError, ValueError) as exc:
        fail(str(exc))
    console.print(f"roster of {roster.size} organizations for federation {roster.fingerprint} -> {target}")
    console.print(f"roster digest [bold]{roster.digest}[/] (every organization must see the same)")


@keys_app.command("seal")
def keys_seal(
    file: Path = typer.Argument(..., help="File to seal, typically participant.ctx."),
    to: Path = typer.Option(..., "--to", help="The recipient organization's PREFIX.x25519.pub."),
    out: Path = typer.Option(..., "--out", help="Where to write the sealed file."),
) -> None:
    """Seal a key file for one organization (X25519 + AES-256-GCM); it can then travel over any channel."""
    from participant.sealing import seal_file

    if not file.is_file():
        fail(f"{file} not found")
    try:
        fingerprint = seal_file(file, to, out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"sealed {file} for recipient {fingerprint} -> {out}")


@keys_app.command("unseal")
def keys_unseal(
    sealed: Path = typer.Argument(..., help="A file written by `fedhe keys seal`."),
    key: Path = typer.Option(..., "--key", help="This organization's PREFIX.x25519 private key."),
    out: Path = typer.Option(
        ...,
        "--out",
        help=(
            "Output folder (created if missing; the file keeps its original name, e.g. participant.ctx) "
            "or a file path with a suffix; mode 0600."
        ),
    ),
) -> None:
    """Recover a sealed key file with this organization's private key (tampering is detected)."""
    from participant.sealing import unseal_file

    try:
        target = unseal_file(sealed, key, out)
    except WireError as exc:
        fail(str(exc))
    console.print(f"unsealed -> {target}")

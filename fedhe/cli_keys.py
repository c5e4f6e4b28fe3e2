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
) -> None:
    """Create a federation key (the key ceremony).

    participant.ctx holds the SECRET key (mode 0600): copy it to every participant out of band.
    coordinator.ctx holds only evaluation keys (public + relinearization): give it to the
    coordinator. Both carry the fingerprint in fingerprint.txt; every message is checked
    against it.
    """
    from participant.keyholder import generate_keys

    try:
        keys = generate_keys(out, profile)
    except (WireError, ValueError) as exc:
        fail(str(exc))
    console.print(f"federation key [bold]{keys.fingerprint}[/] (profile {keys.profile.name})")
    console.print(f"  secret, for participants : {keys.participant_key}")
    console.print(f"  evaluation, coordinator  : {keys.coordinator_key}")


@keys_app.command("inspect")
def keys_inspect(
    file: Path = typer.Argument(..., help="A participant.ctx or coordinator.ctx file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a key file's profile, fingerprint, whether it holds a secret key, and its size."""
    from protos.keyfile import inspect_key_file

    try:
        info = inspect_key_file(file)
    except WireError as exc:
        fail(str(exc))
    data = {
        "file": str(info.path),
        "profile": info.profile.name,
        "fingerprint": info.fingerprint,
        "secret_key": info.has_secret_key,
        "relin_keys": info.has_relin_keys,
        "size_bytes": info.size_bytes,
        "security_bits": info.profile.security_bits,
    }
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

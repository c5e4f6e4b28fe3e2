"""The `fedhe` command line.

It lives on the participant side because most of its commands need the federation's secret key
(keygen, evaluate, simulate runs the participants too); coordinator code never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protos.errors import WireError
from protos.profiles import DEFAULT_PROFILE, PROFILES

app = typer.Typer(
    help=(
        "fedhe-rl: federated reinforcement learning where participants share only CKKS "
        "ciphertexts and the coordinator trains the policy with HE-Adam without a secret key.\n\n"
        "Start with `fedhe simulate` (an encrypted CartPole federation on this machine)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Inspect federation key files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print one JSON object.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
PROFILE_HELP = "HE profile (CKKS parameter set): " + "; ".join(
    f"{p.name}: {p.description}" for p in PROFILES.values()
)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
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


@bench_app.command("he-adam")
def bench_he_adam(
    steps: int = typer.Option(200, help="HE-Adam steps (one refresh each)."),
    params: int = typer.Option(10_000, help="Vector length."),
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help=PROFILE_HELP),
    degree: int = typer.Option(7, help="Degree of the x^-1/2 polynomial (3, 7 or 15)."),
    interval_upper: float = typer.Option(4.0, "--interval-upper", help="B: P is fitted on [beta2, B]."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """HE-Adam on ciphertexts vs the same Adam in NumPy (gradient scale jumps 10x halfway)."""
    from coordinator.he_adam import HEAdamConfig, HEAdamConfigError
    from participant.bench_he_adam import run_he_adam_bench

    config = HEAdamConfig(lr=0.01, clip_bound=1.0, degree=degree, interval_upper=interval_upper)
    try:
        with progress_bar() as bar:
            task = bar.add_task("HE-Adam steps", total=steps)
            result = run_he_adam_bench(
                steps, params, profile, config, seed, on_step=lambda _: bar.advance(task)
            )
    except (HEAdamConfigError, WireError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

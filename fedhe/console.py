"""Shared pieces of the `fedhe` command line: one error style, one progress bar."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from protos.profiles import PROFILES

console = Console(stderr=True, soft_wrap=True)
PROFILE_HELP = "HE profile (CKKS parameter set): " + "; ".join(
    f"{p.name}: {p.description}" for p in PROFILES.values()
)


def fail(message: str) -> None:
    """One red line naming the problem and what to do; exit status 2."""
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


def load_scenario_or_fail(ref: str):
    from scenarios import load_scenario

    try:
        return load_scenario(ref)
    except (ValueError, OSError) as exc:
        fail(str(exc))

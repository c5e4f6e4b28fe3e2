"""The `fedhe` command line: the tools that drive whole federations on one machine.

It stands on top of both sides (it runs the coordinator and the simulated participants, and its
key-holder commands need the federation's secret key); neither side imports it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedhe.cli_bench import bench_app
from fedhe.cli_keys import keygen, keys_app
from fedhe.cli_lab import robustness_app
from fedhe.console import console, fail, progress_bar
from protos.errors import WireError

app = typer.Typer(
    help=(
        "fedhe-rl: federated reinforcement learning where participants share only CKKS "
        "ciphertexts and the coordinator trains the policy with HE-Adam without a secret key.\n\n"
        "Start with `fedhe simulate` (an encrypted CartPole federation on this machine)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bench_app, name="bench")
app.add_typer(robustness_app, name="robustness")
app.command()(keygen)


@app.command()
def scenarios() -> None:
    """List the scenarios you can train: built-ins and installed `fedhe.scenarios` entry points."""
    from scenarios import list_scenarios

    table = Table(title="scenarios (also: any .py file defining SCENARIO = Scenario(...))")
    table.add_column("name")
    table.add_column("source / description")
    for name, description in list_scenarios():
        table.add_row(name, description)
    Console().print(table)


@app.command()
def simulate(
    scenario: str = typer.Argument(
        "cartpole", help="Built-in name, installed entry point, or path/to/file.py defining SCENARIO."
    ),
    participants: int | None = typer.Option(
        None, "--participants", "-n", help="Simulated organizations (default: the scenario's)."
    ),
    rounds: int | None = typer.Option(None, "--rounds", "-r", help="Federated rounds (default: the scenario's)."),
    seed: int | None = typer.Option(
        None,
        help=(
            "Seed for the initial policy and, to make the run reproducible, every simulated participant's private "
            "randomness (default: the scenario's seed for the policy, OS entropy for the participants)."
        ),
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help=(
            "Output directory: checkpoint, metrics.jsonl, summary.json, learning_curve.png, keys/ (default: "
            "runs/SCENARIO-TIMESTAMP)."
        ),
    ),
    plaintext: bool = typer.Option(
        False, "--plaintext", help="Same protocol with encryption replaced by identity (baseline for overhead ratios)."
    ),
    mode: str = typer.Option(
        "local-ppo",
        "--mode",
        help=(
            "local-ppo: participants train PPO locally and send encrypted updates. encrypted-rollouts: they send "
            "encrypted statistics of their rollouts and the coordinator computes the gradient on ciphertexts "
            "(docs/encrypted-rollouts.md)."
        ),
    ),
    rollout_upload: str = typer.Option(
        "statistics",
        "--rollout-upload",
        help=(
            "encrypted-rollouts only. statistics: owners send a few sufficient statistics of their rollouts, "
            "under pairwise masks. transitions: they send every transition encrypted under a key of their "
            "own (any network the coordinator can backpropagate; each owner turns its own gradient into a "
            "masked update; costs an extra exchange and ~10x the coordinator's HE). docs/encrypted-rollouts.md."
        ),
    ),
    server_optimizer: str = typer.Option(
        "adam",
        "--server-optimizer",
        help=(
            "adam: HE-Adam, per-coordinate adaptive steps on ciphertexts (docs/he-adam.md). sgd: HE-SGD with "
            "momentum, the linear baseline (the scenario's server sgd_lr)."
        ),
    ),
    masking: str = typer.Option(
        "auto",
        "--masking",
        help=(
            "pairwise: participants add pairwise masks that cancel in the sum, so a key holder colluding with the "
            "coordinator cannot read an individual update (docs/threat-model.md). off: no masks. auto: pairwise "
            "with 3 or more participants unless the norm-bound/median-norm defenses rule masks out."
        ),
    ),
    pipeline_rollouts: bool = typer.Option(
        False,
        "--pipeline-rollouts",
        help=(
            "local-ppo: each participant collects the next round's rollouts with the current policy while the "
            "coordinator aggregates and steps (HE hidden behind rollouts); PPO's ratio corrects for the one-round-old "
            "behaviour policy. docs/architecture.md."
        ),
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    key_dir: Path | None = typer.Option(
        None, "--key-dir", help="Existing federation keys (default: create DIR/keys; with masking also a roster)."
    ),
    stop_on_solve: bool = typer.Option(
        True,
        "--stop-on-solve/--no-stop-on-solve",
        help="End once the mean return over the last 100 episodes reaches the env's threshold.",
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower and Ray logs."),
) -> None:
    """Train one policy with a simulated federation on this machine (Flower simulation engine).

    With no arguments: encrypted CartPole, 3 participants; only CKKS ciphertexts leave them.

    \b
    Examples:
      fedhe simulate --out runs/c1
      fedhe simulate acrobot -n 5 -r 80 --out runs/a1
      fedhe simulate my_scenario.py --plaintext --out runs/p1
      fedhe simulate cartpole --mode encrypted-rollouts --out runs/r1
      fedhe simulate --resume --out runs/c1
      fedhe evaluate runs/c1            # afterwards: decrypt the policy and run it
    """
    from coordinator.checkpoint import CHECKPOINT_FILE, PREVIOUS_FILE
    from fedhe.simulate import simulate as run
    from protos.plan import resolve_plan
    from protos.settings import RunSettings
    from scenarios import load_scenario
    from scenarios.registry import installed_scenarios

    if scenario not in installed_scenarios() and Path(scenario).is_file():
        scenario = str(Path(scenario).resolve())  # the simulated organizations' workers start elsewhere
    settings = RunSettings(
        scenario=scenario,
        num_server_rounds=rounds or 0,
        plaintext=plaintext,
        mode=mode,
        rollout_upload=rollout_upload,
        server_optimizer=server_optimizer,
        masking=masking,
        pipeline_rollouts=pipeline_rollouts,
        seed=-1 if seed is None else seed,
        stop_on_solve=stop_on_solve,
        resume=resume,
    )
    try:  # resolved once, with the number of organizations (auto masking depends on it)
        n = participants or load_scenario(scenario).num_participants
        plan = resolve_plan(settings, n)
        spec, resolved = plan.scenario, plan.settings
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if out is None:
        if resume:
            fail("--resume needs the run directory: --out DIR")
        out = Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    has_checkpoint = any((out / name).exists() for name in (CHECKPOINT_FILE, PREVIOUS_FILE))
    if resume and not has_checkpoint:
        fail(f"--resume: no checkpoint in {out}; run without --resume first")
    if not resume and has_checkpoint:
        fail(f"{out} already holds a run; use --resume to continue it or choose another --out")
    total = resolved.num_server_rounds
    settings = replace(settings, out_dir=str(out), min_participants=max(1, n - 1))
    kind = "plaintext baseline" if plaintext else f"encrypted, {resolved.he_profile}, masking {resolved.masking}"
    console.print(f"[bold]{spec.name}[/] ({resolved.mode}): {n} participants, up to {total} rounds ({kind}) -> {out}")
    with progress_bar() as bar:
        task = bar.add_task("rounds", total=total)

        def on_round(outcome, released) -> None:
            ret = (
                "" if not released or released.get("mean_return") is None else f" return {released['mean_return']:.1f}"
            )
            bar.update(task, completed=outcome.round, description=f"round {outcome.round}{ret}")

        try:
            summary = run(settings, n, key_dir, on_round=on_round, verbose=verbose, node_seed=seed)
        except (WireError, ValueError, RuntimeError) as exc:
            fail(str(exc))
    print_summary(summary, out)
    if summary["rounds"] == 0:
        failures = [f["reason"] for r in summary.get("failed_rounds", []) for f in r["failed"]]
        causes = Counter(failures or [r["cause"] for r in summary.get("failed_rounds", [])])
        said = "; ".join(f"{cause} ({count}x)" for cause, count in causes.most_common(3)) or "see the log above"
        fail(f"no round completed: {said}. Fix the cause and run again (--verbose shows tracebacks)")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(
        ..., help="A directory written by `fedhe simulate --out` (or the coordinator's out-dir)."
    ),
    key_dir: Path | None = typer.Option(
        None, "--key-dir", help="Directory with participant.ctx (default: RUN_DIR/keys)."
    ),
    episodes: int = typer.Option(20, help="Greedy evaluation episodes."),
    scenario: str | None = typer.Option(None, help="Override the scenario recorded in RUN_DIR/run.json."),
    participant_index: int = typer.Option(0, help="Whose environment variant to evaluate in."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON."),
) -> None:
    """Decrypt the latest checkpoint's policy (needs the secret key) and evaluate it greedily."""
    from fedhe.evaluate import evaluate_run

    try:
        result = evaluate_run(run_dir, key_dir, episodes, scenario, participant_index)
    except (WireError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"greedy evaluation of {run_dir}", show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    Console().print(table)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"summary ({out / 'summary.json'})", show_header=False)
    for key, value in summary.items():
        if key == "failed_rounds":  # the causes are in summary.json and were printed as they happened
            value = f"{len(value)} (rounds {', '.join(str(r['round']) for r in value)})" if value else "0"
        if key == "organizations":  # one row each: rounds answered, failed and why
            for name, org in value.items():
                why = ", ".join(f"{k} {n}" for k, n in org["why"].items())
                table.add_row(f"  {name}", f"{org['status']}: {org['rounds_answered']} answered, "
                              f"{org['rounds_failed']} failed" + (f" ({why})" if why else ""))
            continue
        table.add_row(key, str(value).lower() if isinstance(value, bool) else str(value))
    Console().print(table)
    console.print(f"learning curve: {out / 'learning_curve.png'}   metrics: {out / 'metrics.jsonl'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

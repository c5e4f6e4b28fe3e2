"""`fedhe robustness aggregation|policy`: the threat lab's two grids of encrypted federations."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedhe.console import PROFILE_HELP, console, fail, load_scenario_or_fail, progress_bar
from protos.errors import WireError

robustness_app = typer.Typer(
    help=(
        "Measure robustness with encrypted federations: malicious participants against robust "
        "aggregation (`aggregation`), or attacks on trained policies (`policy`). Definitions and "
        "measured tables: docs/threat-lab.md."
    ),
    no_args_is_help=True,
)
SCENARIO_ARG = typer.Argument(
    "cartpole", help="Built-in name, installed entry point, or path/to/file.py defining SCENARIO."
)


@robustness_app.command("aggregation")
def aggregation(
    scenario: str = SCENARIO_ARG,
    participants: int = typer.Option(10, "--participants", "-n", help="Simulated organizations."),
    malicious: int = typer.Option(3, "--malicious", "-m", help="How many of them misbehave (indices 0..m-1)."),
    attack: list[str] = typer.Option(
        ["sign-flip"],
        "--attack",
        help=(
            "Repeatable. sign-flip, scale, noise, zero, reward-flip, reward-shuffle, random-action, alie, ipm "
            "(fedhe/lab/malicious.py)."
        ),
    ),
    defense: list[str] = typer.Option(
        ["none", "median-norm"],
        "--defense",
        help="Repeatable. none, norm-bound, median-norm (encrypted masked norms), dp (distributed Gaussian noise).",
    ),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per cell (0..K-1)."),
    rounds: int = typer.Option(150, "--rounds", "-r", help="Round cap per run (runs stop once solved)."),
    out: Path = typer.Option(
        Path("fedhe-robustness"),
        "--out",
        help="Directory: robustness.json, robustness.md, robustness.png, cells/ (reused when re-run).",
    ),
    dp_noise: float = typer.Option(1.0, "--dp-noise", help="Noise multiplier z for --defense dp."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="delta for the reported epsilon."),
    bound: float = typer.Option(
        0.0, "--bound", help="norm-bound's L2 bound per update (0: the scenario's clip bound C)."
    ),
    profile: str = typer.Option(
        "n16k-d7", "--profile", help="HE profile for every cell (robust defenses need one spare level). " + PROFILE_HELP
    ),
    plaintext: bool = typer.Option(False, "--plaintext", help="Same protocol without encryption (debugging only)."),
    no_clean: bool = typer.Option(False, "--no-clean", help="Skip the clean (attack none) baselines."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Malicious participants x robust aggregation, every combination as an encrypted federation.

    \b
    Example:
      fedhe robustness aggregation cartpole -n 10 -m 3 --attack sign-flip --defense none --defense median-norm
    writes OUT/robustness.json (one row per attack, defense, seed), OUT/robustness.md (return,
    % of the clean baseline, slowdown) and OUT/robustness.png; clean baselines (attack none) run
    for every defense unless --no-clean.
    """
    from fedhe.lab.aggregation_grid import GridSpec, run_grid

    spec = GridSpec(
        scenario=scenario,
        out=out,
        participants=participants,
        malicious=malicious,
        attacks=list(attack),
        defenses=list(defense),
        seeds=seeds,
        rounds=rounds,
        dp_noise_multiplier=dp_noise,
        dp_delta=dp_delta,
        defense_bound=bound,
        he_profile=profile,
        plaintext=plaintext,
        clean=not no_clean,
    )
    try:
        spec.validate()
        load_scenario_or_fail(scenario)
        with progress_bar() as bar:
            task = bar.add_task("federations", total=None)

            def on_row(row: dict, done: int, total: int) -> None:
                bar.update(
                    task,
                    completed=done,
                    total=total,
                    description=f"{row['attack']}/{row['defense']} seed {row['seed']}: return {row['final_return']}",
                )

            rows = run_grid(spec, on_row=on_row)
    except (WireError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    console.print((out / "robustness.md").read_text())
    console.print(f"rows: {out / 'robustness.json'}   plot: {out / 'robustness.png'}")


@robustness_app.command("policy")
def policy(
    scenario: str = SCENARIO_ARG,
    train: list[str] = typer.Option(
        ["vanilla"],
        "--train",
        help=(
            "Repeatable. vanilla, sa-ppo, noise-injection, reward-defense: one encrypted federation per mode and seed, "
            "trained with that local robust training."
        ),
    ),
    eval_attack: list[str] = typer.Option(
        ["fgsm", "gaussian"],
        "--eval-attack",
        help=(
            "Repeatable. Attack on the decrypted policy: fgsm, pgd, mad, gaussian, action "
            "(fedhe/lab/policy_attacks.py)."
        ),
    ),
    epsilon: float = typer.Option(
        0.5, "--epsilon", help="Observation-attack budget: l-inf radius in per-dimension state stds (see --std-source)."
    ),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        help="Probability of the adversarial action for --eval-attack action (default: --epsilon, clipped to [0, 1]).",
    ),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per train mode (0..K-1)."),
    participants: int | None = typer.Option(
        None, "--participants", "-n", help="Simulated organizations (default: the scenario's)."
    ),
    rounds: int | None = typer.Option(None, "--rounds", "-r", help="Rounds per federation (default: the scenario's)."),
    episodes: int = typer.Option(20, "--episodes", help="Greedy evaluation episodes per policy."),
    stop_on_solve: bool = typer.Option(
        False,
        "--stop-on-solve",
        help=(
            "Stop each federation once solved (default: every federation trains the full round budget, "
            "so train modes are compared at equal training)."
        ),
    ),
    std_source: str = typer.Option(
        "reference",
        "--std-source",
        help=(
            "State std (sigma) for epsilon: reference (the scenario's fixed sigma: SA-DQN's published stds for "
            "cartpole/acrobot, else a uniform random policy's states; SA-PPO/noise training use it too), random (a "
            "uniform random policy's states) or clean (the evaluated policy's own clean greedy states)."
        ),
    ),
    out: Path = typer.Option(
        Path("fedhe-policy-robustness"),
        "--out",
        help=(
            "Directory: robustness.json, robustness.md, attributions/, runs/ (trained policies are reused when re-run)."
        ),
    ),
    plaintext: bool = typer.Option(False, "--plaintext", help="Same protocol without encryption (debugging only)."),
    as_json: bool = typer.Option(False, "--json", help="Print rows and summary as JSON."),
) -> None:
    """Attacks on trained policies: train per mode and seed, attack the decrypted policy.

    \b
    Example:
      fedhe robustness policy cartpole --train vanilla --train sa-ppo \\
          --eval-attack fgsm --eval-attack gaussian --epsilon 0.5 --seeds 3
    Writes OUT/robustness.json (one row per train mode, attack and seed: returns, crr, pd_tv, pd_kl, ...),
    OUT/robustness.md (baseline, under attack, % drop, policy deviation) and OUT/attributions/.
    """
    from fedhe.lab.policy_attacks import ATTACKS
    from fedhe.lab.policy_grid import STD_SOURCES, TRAIN_MODES, run_policy_robustness

    for name in train:
        if name not in TRAIN_MODES:
            fail(f"unknown --train {name!r}; known: {', '.join(TRAIN_MODES)}")
    for name in eval_attack:
        if name not in ATTACKS:
            fail(f"unknown --eval-attack {name!r}; known: {', '.join(ATTACKS)}")
    if std_source not in STD_SOURCES:
        fail(f"--std-source must be one of {', '.join(STD_SOURCES)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        fail(f"--alpha is a probability: it must be in [0, 1], got {alpha}")
    load_scenario_or_fail(scenario)
    try:
        with progress_bar() as bar:
            task = bar.add_task("federations", total=None)

            def on_run(mode: str, seed: int, run: dict) -> None:
                bar.update(task, advance=1, description=f"{mode} seed {seed}: clean return {run['clean_return']:.1f}")

            report = run_policy_robustness(
                scenario,
                train,
                eval_attack,
                epsilon,
                seeds,
                out,
                episodes=episodes,
                rounds=rounds,
                plaintext=plaintext,
                std_source=std_source,
                participants=participants,
                on_run=on_run,
                stem="robustness",
                stop_on_solve=stop_on_solve,
                alpha=alpha,
            )
    except (WireError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"rows": report["rows"], "summary": report["summary"]}))
        return
    console.print((out / "robustness.md").read_text())
    console.print(f"rows: {out / 'robustness.json'}")
